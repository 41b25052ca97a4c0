"""Configuration: one typed schema, YAML files with ``_BASE_`` inheritance, CLI overrides.

Every key is declared once below, with its default and a comment. YAML files only
override keys and may inherit from other files with ``_BASE_: path`` (relative to the
file, or to the configs shipped with the package, :data:`CONFIG_ROOT`). ``KEY=VALUE``
arguments override last; values are parsed as YAML (``SOLVER.STEPS=[100,200]``). An
unknown key is an error that names the closest valid key; a value of the wrong type names
the key, the value and the type.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ore.errors import OreError
from ore.fileio import read_yaml

# The detector configs shipped as package data (``toy/``, ``owod/``, ``sowod/``): a name
# such as ``toy/t1_train.yaml`` that is not a file where the user stands is looked up here.
CONFIG_ROOT = Path(str(importlib.resources.files("ore") / "configs"))


def _list(*values):
    return field(default_factory=lambda: list(values))


@dataclass
class BackboneConfig:
    # Trunk + FPN: resnet50_fpn | resnet18_fpn | tiny_fpn.
    NAME: str = "resnet50_fpn"
    # Normalisation in the trunk: FrozenBN (pretrained weights) | BN | GN (from scratch).
    NORM: str = "FrozenBN"
    # Local file with trunk weights (torchvision ResNet state dict or `ore pretrain` output).
    WEIGHTS: str = ""
    # Trunk stages to train, counted from the top (0..5; 5 trains the stem too).
    TRAINABLE_LAYERS: int = 3
    # Trunk stages (1..4) that feed the feature pyramid.
    RETURNED_STAGES: list[int] = _list(1, 2, 3, 4)
    # Channels of every pyramid level.
    FPN_CHANNELS: int = 256


@dataclass
class AnchorConfig:
    # Anchor sizes (pixels), one list per pyramid level including the pooled top level.
    SIZES: list[list[int]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    # Height/width ratios used at every level.
    ASPECT_RATIOS: list[float] = _list(0.5, 1.0, 2.0)


@dataclass
class RPNConfig:
    # Proposals kept per pyramid level before NMS, in training / at test time.
    PRE_NMS_TOP_N_TRAIN: int = 2000
    PRE_NMS_TOP_N_TEST: int = 1000
    # Proposals kept per image after NMS, in training / at test time.
    POST_NMS_TOP_N_TRAIN: int = 2000
    POST_NMS_TOP_N_TEST: int = 1000
    # NMS IoU threshold between proposals.
    NMS_THRESH: float = 0.7
    # Anchors with IoU >= FG_IOU_THRESH to a GT box are positives; < BG_IOU_THRESH negatives.
    FG_IOU_THRESH: float = 0.7
    BG_IOU_THRESH: float = 0.3
    # Anchors sampled per image for the RPN loss, and the positive fraction among them.
    BATCH_SIZE_PER_IMAGE: int = 256
    POSITIVE_FRACTION: float = 0.5
    # How objectness is learnt: classification (Faster R-CNN: unannotated objects are
    # negatives) | quality (regress the anchor's IoU with a GT box on anchors with
    # IoU >= QUALITY_IOU only; nothing is a negative). See ore/modeling/rpn.py.
    OBJECTNESS: str = "classification"
    QUALITY_IOU: float = 0.3


@dataclass
class ROIHeadsConfig:
    # Box head: standard (closed-set Faster R-CNN baseline) | ore.
    NAME: str = "standard"
    # RoIs sampled per image for the box losses, and the positive fraction among them.
    BATCH_SIZE_PER_IMAGE: int = 512
    POSITIVE_FRACTION: float = 0.25
    # Proposals with IoU >= FG_IOU_THRESH to a GT box are foreground; < BG_IOU_THRESH background.
    FG_IOU_THRESH: float = 0.5
    BG_IOU_THRESH: float = 0.5
    # Detections under this score are dropped at test time.
    SCORE_THRESH_TEST: float = 0.05
    # The same for detections labelled unknown (ORE head); < 0 = SCORE_THRESH_TEST.
    UNKNOWN_SCORE_THRESH_TEST: float = -1.0
    # Class-wise NMS IoU threshold at test time.
    NMS_THRESH_TEST: float = 0.5
    # Most detections kept per image.
    DETECTIONS_PER_IMAGE: int = 100


@dataclass
class BoxHeadConfig:
    # RoIAlign output size (square) and sampling points per bin.
    POOLER_RESOLUTION: int = 7
    POOLER_SAMPLING_RATIO: int = 2
    # Width of the two fully connected layers; the last one is the RoI feature f.
    FC_DIM: int = 1024


@dataclass
class ModelConfig:
    # Full detector checkpoint to start from (e.g. the previous task's final weights).
    WEIGHTS: str = ""
    BACKBONE: BackboneConfig = field(default_factory=BackboneConfig)
    ANCHOR: AnchorConfig = field(default_factory=AnchorConfig)
    RPN: RPNConfig = field(default_factory=RPNConfig)
    ROI_HEADS: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    ROI_BOX_HEAD: BoxHeadConfig = field(default_factory=BoxHeadConfig)


@dataclass
class InputConfig:
    # Training shortest side: sampled uniformly from this [min, max] range per image.
    MIN_SIZE_TRAIN: list[int] = _list(480, 800)
    # Longest side cap in training.
    MAX_SIZE_TRAIN: int = 1333
    # Shortest side and longest-side cap at test time.
    MIN_SIZE_TEST: int = 800
    MAX_SIZE_TEST: int = 1333
    # Probability of a horizontal flip in training.
    FLIP_PROB: float = 0.5
    # Per-channel RGB mean and std (0..1 pixel scale) used to normalise images.
    PIXEL_MEAN: list[float] = _list(0.485, 0.456, 0.406)
    PIXEL_STD: list[float] = _list(0.229, 0.224, 0.225)
    # Images with more pixels are refused from their header, before decoding (a small PNG
    # can hold a 30000×30000 image that takes tens of GB decoded); 0 = no limit.
    MAX_PIXELS: int = 64_000_000


@dataclass
class DatasetsConfig:
    # Dataset root (VOC/OWOD layout, or COCO JSON under <ROOT>/annotations/).
    ROOT: str = "datasets/OWOD"
    # Annotation format: voc | coco.
    FORMAT: str = "voc"
    # Image folder under ROOT.
    IMAGE_DIR: str = "JPEGImages"
    # Class split: owod | sowod | toy | path to a YAML file with `tasks: [[...], ...]`.
    CLASSES: str = "owod"
    # Training list (ImageSets/Main/<name>.txt) and the role that filters its annotations.
    TRAIN: str = "t1_train"
    # Role of the training list: train (task's own classes) | finetune (all seen classes).
    TRAIN_ROLE: str = "train"
    # Evaluation list; every object of an unseen class is `unknown` there.
    TEST: str = "all_task_test"
    # Count each TEST image once even where the list repeats its id. Default false: every
    # listed line counts, as in the published figures (all_task_test: 10,246 lines, 9,119
    # images); the model runs once per image either way.
    TEST_UNIQUE_IMAGES: bool = False


@dataclass
class DataLoaderConfig:
    # Worker processes that decode and augment images (0 = in the main process).
    NUM_WORKERS: int = 4
    # Batch images of similar aspect ratio together (less padding).
    ASPECT_RATIO_GROUPING: bool = True
    # Skip images that cannot be decoded (with a warning and a count) instead of stopping.
    SKIP_BAD_IMAGES: bool = False


@dataclass
class SolverConfig:
    # Images per iteration over all processes.
    IMS_PER_BATCH: int = 8
    # Optimiser: SGD (momentum MOMENTUM, the reference) | AdamW (betas 0.9, 0.999).
    OPTIMIZER: str = "SGD"
    # Learning rate for IMS_PER_BATCH images.
    BASE_LR: float = 0.01
    MOMENTUM: float = 0.9
    WEIGHT_DECAY: float = 0.0001
    # The iteration counter at this run's first iteration. MAX_ITER, STEPS, WARMUP_ITERS and
    # checkpoint names count on it, so a run trains MAX_ITER - START_ITER iterations; with
    # the ORE head a fresh run > 0 sets the head's counter (CLUSTERING.*_ITER) to it too.
    # The reference continued one counter across tasks (task 2: 18000 -> 70000).
    START_ITER: int = 0
    # Iteration at which this run ends (its length when START_ITER is 0).
    MAX_ITER: int = 18000
    # Iterations at which the learning rate is multiplied by GAMMA.
    STEPS: list[int] = _list(12000, 16000)
    GAMMA: float = 0.1
    # Linear warmup: the rate starts at BASE_LR * WARMUP_FACTOR and reaches BASE_LR here.
    WARMUP_ITERS: int = 100
    WARMUP_FACTOR: float = 0.001
    # Clip the global gradient norm to this value (0 = no clipping).
    CLIP_GRAD_NORM: float = 0.0
    # Write a checkpoint every this many iterations (and at the end).
    CHECKPOINT_PERIOD: int = 5000
    # Periodic checkpoints kept on disk (the final one is always kept).
    KEEP_CHECKPOINTS: int = 3
    # Log losses and the learning rate to metrics.jsonl every this many iterations.
    LOG_PERIOD: int = 20
    # Mixed precision: off | bf16 (CUDA or CPU autocast) | fp16 (CUDA only, with a GradScaler).
    AMP: str = "off"


@dataclass
class OWODConfig:
    # Current task (1-based): which classes are introduced / seen.
    TASK: int = 1
    # Proposals auto-labelled `unknown` per training image (ORE head).
    NUM_UNK_PER_IMAGE: int = 1
    # Where they are picked: proposals (all post-NMS proposals) | sampled (the reference:
    # among the sampled background RoIs).
    UNK_SOURCE: str = "proposals"
    # A candidate unknown overlaps every GT box by less than this IoU.
    UNK_IOU_THRESH: float = 0.5
    # What the RPN learns of the top proposals overlapping no GT box (ORE head; picked as
    # with UNK_SOURCE proposals): negative (the paper: anchors on them stay negatives) |
    # ignore (negative anchors near them leave the loss) | positive (RPN targets like GT).
    RPN_UNKNOWNS: str = "negative"
    # How many top proposals per image that mode applies to (0 = NUM_UNK_PER_IMAGE).
    RPN_NUM_UNK: int = 0
    # Box-regress the auto-labelled unknowns too: toward the GT box they overlap most
    # (UNK_SOURCE sampled, as the reference did) or toward the picked proposal (proposals).
    REGRESS_UNKNOWNS: bool = False


@dataclass
class ClusteringConfig:
    # Contrastive clustering of RoI features around class prototypes (ORE head only).
    ENABLED: bool = True
    # Length of each class's feature queue.
    ITEMS_PER_CLASS: int = 20
    # Hinge margin Δ: features are pushed at least this far from other classes' prototypes.
    MARGIN: float = 10.0
    # Order p of the Minkowski distance between a feature and a prototype (2 = Euclidean).
    DISTANCE_P: float = 2.0
    # Iteration at which prototypes are first computed and the loss switches on.
    START_ITER: int = 1000
    # Prototypes move every this many iterations after START_ITER.
    UPDATE_MU_ITER: int = 3000
    # Momentum η of prototype updates: p <- η p + (1 - η) mean(queue).
    MOMENTUM: float = 0.99
    # Weight of the clustering loss.
    LOSS_WEIGHT: float = 0.1
    # sum: Σ of the hinge terms over the prototypes that exist, mean over features |
    # mean: the mean over features × every store row, rows without a prototype counting 0
    # (the reference's average, ~1/rows of the sum).
    LOSS_REDUCTION: str = "sum"
    # The store keeps a row for background RoIs (their features queue like a class's) and
    # every foreground feature is pushed away from its prototype too (the reference).
    BACKGROUND_ROW: bool = False
    # mean: a class's prototype starts at its queue mean the first time it has features and
    # is kept from task to task; classes without features have none and stay out of the loss |
    # zero (the reference): at START_ITER every prototype is reset, to the queue mean where
    # the queue holds features (this iteration's included) and to zero elsewhere; every row
    # is in the loss, and a zero prototype moves (1 - MOMENTUM) of the way at each update.
    PROTOTYPE_INIT: str = "mean"
    # When prototypes move: after_start (START_ITER + k·UPDATE_MU_ITER) | multiples
    # (iterations divisible by UPDATE_MU_ITER, the reference).
    UPDATE_PHASE: str = "after_start"


@dataclass
class ExemplarsConfig:
    # Images per seen class in the balanced exemplar set of a finetune (reference: 50).
    PER_CLASS: int = 50
    # `ore run-tasks` builds the exemplar list itself (else DATASETS.TRAIN is used as given).
    BUILD: bool = True
    # Training lists to draw exemplars from; empty = t1_train … t<TASK>_train.
    SOURCES: list[str] = field(default_factory=list)


@dataclass
class EBUIConfig:
    # Energy-based unknown identifier (ORE head, SPEC §3.3): relabel known-class detections
    # as unknown at inference. Needs FIT_FILE; a missing fit file is an error, never skipped.
    ENABLED: bool = False
    # energy_fit.json written by `ore fit-energy` (or by `ore run-tasks` for each task).
    FIT_FILE: str = ""
    # T of E = -T*logsumexp(seen logits / T); the fit file must have been made with this T.
    TEMPERATURE: float = 1.5
    # T of the energies scored at inference; ≤ 0: TEMPERATURE (the fit's). The reference
    # fitted at 1.5 and scored at 1 (SPEC §3.3).
    SCORE_TEMPERATURE: float = -1.0
    # What counts as an unknown sample when fitting: labelled (unknown-class objects of the
    # held-out split, as the reference) | pseudo (RPN auto-labelled unknowns only).
    MODE: str = "labelled"
    # Held-out list whose RoIs are fitted (test role: unseen classes become unknown).
    FIT_SPLIT: str = "all_task_val"
    # Prior of the relabelling decision: equal (compare the two densities, the reference) |
    # counts (weigh each density by its share of the fit's samples: the Bayes decision).
    PRIOR: str = "equal"
    # Drop an `unknown` detection whose densities say known (p_unk ≤ p_known; the reference).
    DROP_UNKNOWNS: bool = False
    # Run class-wise NMS again after relabelling (the reference did not).
    SECOND_NMS: bool = True
    # `ore run-tasks` fits the energy after each task (ORE head) and adds an "ebui" evaluation.
    RUN_TASKS: bool = True
    # The "ebui" evaluation is the task's reported figure (the paper's ORE); false: it is
    # kept as a diagnostic and the finetuned (or trained) model without EBUI is reported.
    REPORTED: bool = True


@dataclass
class Config:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    INPUT: InputConfig = field(default_factory=InputConfig)
    DATASETS: DatasetsConfig = field(default_factory=DatasetsConfig)
    DATALOADER: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    SOLVER: SolverConfig = field(default_factory=SolverConfig)
    OWOD: OWODConfig = field(default_factory=OWODConfig)
    CLUSTERING: ClusteringConfig = field(default_factory=ClusteringConfig)
    EXEMPLARS: ExemplarsConfig = field(default_factory=ExemplarsConfig)
    EBUI: EBUIConfig = field(default_factory=EBUIConfig)
    # Device: auto (CUDA when available) | cpu | cuda | cuda:N.
    DEVICE: str = "auto"
    # Seed for every random generator; the same seed and inputs give the same run.
    SEED: int = 0
    # Use deterministic algorithms (slower on GPU).
    DETERMINISTIC: bool = False
    # Folder for checkpoints, metrics.jsonl and outputs of this run.
    OUTPUT_DIR: str = "runs/default"


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key (of each element, for a list key): between
    ``lo`` and ``hi`` (None: unbounded), each bound included unless ``*_open``; with
    ``ordered`` a list's elements must not decrease."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    ordered: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '≤'} {self.hi:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


_COUNT, _AT_LEAST_0 = Range(1), Range(0)
_POSITIVE, _FRACTION, _SHARE = Range(0, lo_open=True), Range(0, 1), Range(0, 1, lo_open=True)

# The valid range of every numeric key, checked by load_config once everything is merged
# (before any command writes a file). Every float must also be finite.
VALID_RANGES: dict[str, Range] = {
    "MODEL.BACKBONE.TRAINABLE_LAYERS": Range(0, 5),
    "MODEL.BACKBONE.RETURNED_STAGES": Range(1, 4, ordered=True),
    "MODEL.BACKBONE.FPN_CHANNELS": _COUNT,
    "MODEL.ANCHOR.SIZES": _COUNT,
    "MODEL.ANCHOR.ASPECT_RATIOS": _POSITIVE,
    "MODEL.RPN.PRE_NMS_TOP_N_TRAIN": _COUNT,
    "MODEL.RPN.PRE_NMS_TOP_N_TEST": _COUNT,
    "MODEL.RPN.POST_NMS_TOP_N_TRAIN": _COUNT,
    "MODEL.RPN.POST_NMS_TOP_N_TEST": _COUNT,
    "MODEL.RPN.NMS_THRESH": _FRACTION,
    "MODEL.RPN.FG_IOU_THRESH": _FRACTION,
    "MODEL.RPN.BG_IOU_THRESH": _FRACTION,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": _COUNT,
    "MODEL.RPN.POSITIVE_FRACTION": _SHARE,
    "MODEL.RPN.QUALITY_IOU": _FRACTION,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": _COUNT,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": _SHARE,
    "MODEL.ROI_HEADS.FG_IOU_THRESH": _FRACTION,
    "MODEL.ROI_HEADS.BG_IOU_THRESH": _FRACTION,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": _FRACTION,
    "MODEL.ROI_HEADS.UNKNOWN_SCORE_THRESH_TEST": Range(None, 1),  # < 0: SCORE_THRESH_TEST
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": _FRACTION,
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE": _COUNT,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": _COUNT,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": _AT_LEAST_0,  # 0: adaptive
    "MODEL.ROI_BOX_HEAD.FC_DIM": _COUNT,
    "INPUT.MIN_SIZE_TRAIN": Range(1, ordered=True),
    "INPUT.MAX_SIZE_TRAIN": _COUNT,
    "INPUT.MIN_SIZE_TEST": _COUNT,
    "INPUT.MAX_SIZE_TEST": _COUNT,
    "INPUT.FLIP_PROB": _FRACTION,
    "INPUT.PIXEL_MEAN": _FRACTION,
    "INPUT.PIXEL_STD": _POSITIVE,
    "INPUT.MAX_PIXELS": _AT_LEAST_0,
    "DATALOADER.NUM_WORKERS": _AT_LEAST_0,
    "SOLVER.IMS_PER_BATCH": _COUNT,
    "SOLVER.BASE_LR": _POSITIVE,
    "SOLVER.MOMENTUM": _FRACTION,
    "SOLVER.WEIGHT_DECAY": _AT_LEAST_0,
    "SOLVER.START_ITER": _AT_LEAST_0,
    "SOLVER.MAX_ITER": _COUNT,
    "SOLVER.STEPS": Range(1, ordered=True),
    "SOLVER.GAMMA": _POSITIVE,
    "SOLVER.WARMUP_ITERS": _AT_LEAST_0,
    "SOLVER.WARMUP_FACTOR": _FRACTION,
    "SOLVER.CLIP_GRAD_NORM": _AT_LEAST_0,
    "SOLVER.CHECKPOINT_PERIOD": _COUNT,
    "SOLVER.KEEP_CHECKPOINTS": _COUNT,
    "SOLVER.LOG_PERIOD": _COUNT,
    "OWOD.TASK": _COUNT,
    "OWOD.NUM_UNK_PER_IMAGE": _AT_LEAST_0,
    "OWOD.UNK_IOU_THRESH": _FRACTION,
    "OWOD.RPN_NUM_UNK": _AT_LEAST_0,
    "CLUSTERING.ITEMS_PER_CLASS": _COUNT,
    "CLUSTERING.MARGIN": _AT_LEAST_0,
    "CLUSTERING.DISTANCE_P": _POSITIVE,
    "CLUSTERING.START_ITER": _AT_LEAST_0,
    "CLUSTERING.UPDATE_MU_ITER": _COUNT,
    "CLUSTERING.MOMENTUM": _FRACTION,
    "CLUSTERING.LOSS_WEIGHT": _AT_LEAST_0,
    "EXEMPLARS.PER_CLASS": _COUNT,
    "EBUI.TEMPERATURE": _POSITIVE,
    "EBUI.SCORE_TEMPERATURE": Range(-1),  # ≤ 0: EBUI.TEMPERATURE
    "SEED": _AT_LEAST_0,
}
# Pairs (low, high) of keys whose values must not cross.
ORDERED_KEYS = (
    ("MODEL.RPN.BG_IOU_THRESH", "MODEL.RPN.FG_IOU_THRESH"),
    ("MODEL.ROI_HEADS.BG_IOU_THRESH", "MODEL.ROI_HEADS.FG_IOU_THRESH"),
    ("SOLVER.START_ITER", "SOLVER.MAX_ITER"),
)


def _numbers(value: Any) -> list:
    """The numbers of a value, nested lists flattened (booleans and strings are not)."""
    if isinstance(value, list | tuple):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _leaf_type(tp: Any) -> Any:
    while typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return tp


def check_values(cfg: DictConfig) -> None:
    """Every float is finite and every key of :data:`VALID_RANGES` in its range; a
    one-line :class:`OreError` naming the key, the value and the range."""
    for key, tp in SCHEMA_TYPES.items():
        leaf = _leaf_type(tp)
        if leaf not in (int, float):
            continue
        value = OmegaConf.select(cfg, key)
        plain = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
        numbers = _numbers(plain)
        many = isinstance(plain, list)
        noun = {(int, False): "an integer", (int, True): "integers",
                (float, False): "a finite number", (float, True): "finite numbers"}[leaf, many]
        valid = VALID_RANGES.get(key)
        bounds = f" {valid.describe()}" if valid else ""
        in_range = all(v in valid for v in numbers) if valid else True
        if not in_range or not all(math.isfinite(v) for v in numbers):
            raise OreError(f"{key}={plain!r} is out of range; expected {noun}{bounds}")
        if valid is not None and valid.ordered and numbers != sorted(numbers):
            raise OreError(f"{key}={plain!r}: expected {noun}{bounds} in increasing order")
    for low, high in ORDERED_KEYS:
        lo, hi = OmegaConf.select(cfg, low), OmegaConf.select(cfg, high)
        if lo is not None and hi is not None and lo > hi:
            raise OreError(f"{low}={lo!r} is above {high}={hi!r}; expected {low} ≤ {high}")


def _schema_types(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Flat map from dotted key to its annotated type (sections map to their dataclass)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        out[key] = tp
        if dataclasses.is_dataclass(tp):
            out.update(_schema_types(tp, key + "."))
    return out


SCHEMA_TYPES = _schema_types()


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def _closest(key: str) -> str:
    """The valid key most similar to ``key``, comparing whole paths and leaf names."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        leaves = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        # A key in the right section is the likelier intent.
        same_section = candidate.rsplit(".", 1)[0] == key.rsplit(".", 1)[0] and "." in candidate
        return max(whole, leaves) + 0.2 * same_section

    return max(SCHEMA_TYPES, key=score)


def _check_keys(data: dict, source: str, prefix: str = "") -> None:
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key not in SCHEMA_TYPES:
            raise OreError(f"{source}: unknown key {key}; did you mean {_closest(key)}?")
        is_section = dataclasses.is_dataclass(SCHEMA_TYPES[key])
        if is_section and not isinstance(v, dict):
            raise OreError(f"{source}: key {key} is a section; expected a mapping, got {v!r}")
        if is_section:
            _check_keys(v, source, key + ".")


def _merge_into(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    _check_keys(data, source)
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        # full_key names a list element as SOLVER.STEPS[0] or MODEL.ANCHOR.SIZES[1][0].
        full_key = getattr(exc, "full_key", None) or "?"
        key = full_key.split("[", 1)[0]
        value = _lookup(data, key)
        tp = SCHEMA_TYPES.get(key, None)
        message = f"{source}: key {key}: value {value!r} is not of the expected type "
        message += _type_name(tp)
        if "[" in full_key:
            element = value
            for i in re.findall(r"\[(\d+)\]", full_key):
                element = element[int(i)] if isinstance(element, list) and int(i) < len(
                    element) else "?"
            while typing.get_origin(tp) is list:
                tp = typing.get_args(tp)[0]
            message += f" (element {element!r} is not of type {_type_name(tp)})"
        raise OreError(message) from None


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return "?"
    return node


def resolve_config_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config file: as given, relative to ``relative_to``, or under :data:`CONFIG_ROOT`."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [
        *([relative_to / p] if relative_to else []), p, CONFIG_ROOT / p
    ]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise OreError(f"config file not found: {path}")


def _read_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file and its ``_BASE_`` ancestors, root first."""
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise OreError(f"config inheritance loops: {chain}")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise OreError(f"{path}: expected a mapping of config keys at the top level")
    base = data.pop("_BASE_", None)
    chain: list[tuple[Path, dict]] = []
    if base is not None:
        if not isinstance(base, str):
            raise OreError(f"{path}: _BASE_ must be a path string, got {base!r}")
        chain = _read_chain(resolve_config_path(base, path.parent), (*stack, path))
    return [*chain, (path, data)]


def parse_override(text: str) -> dict:
    """``A.B.C=value`` → ``{"A": {"B": {"C": value}}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise OreError(f"override {text!r}: expected KEY=VALUE, e.g. SOLVER.BASE_LR=0.02")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> DictConfig:
    """Defaults, then the YAML chain of ``path`` (root first), then ``KEY=VALUE`` overrides;
    every value is then checked against :data:`VALID_RANGES`."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for file, data in _read_chain(resolve_config_path(path)):
            cfg = _merge_into(cfg, data, str(file))
    for text in overrides:
        cfg = _merge_into(cfg, parse_override(text), f"override {text!r}")
    check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved inside a checkpoint (validated like a file)."""
    cfg = _merge_into(OmegaConf.structured(Config), data, "checkpoint config")
    check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in saved, value in cfg)}`` for every key where ``saved`` (a
    config as a run wrote it, e.g. read from its ``config.yaml``) and ``cfg`` differ, in
    key order. A key ``saved`` lacks (one declared after it was written) counts as its
    default; a key ``cfg`` lacks (one since removed) as None."""
    then = {**_flat(OmegaConf.to_container(OmegaConf.structured(Config))), **_flat(saved)}
    now = _flat(OmegaConf.to_container(cfg))
    return {k: (then.get(k), now.get(k)) for k in sorted(then.keys() | now.keys())
            if k not in then or k not in now or then[k] != now[k]}
