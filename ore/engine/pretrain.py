"""Backbone pretraining: self-supervised (or supervised-contrastive) training of a trunk.

Trains the trunk of ``arch`` with one method of :mod:`ore.contrastive.methods` on a
folder of images, the images of a detection dataset's list (``ROOT:LIST``, read from
``ROOT/ImageSets/Main/LIST.txt``) or Fashion-MNIST and writes ``trunk.state_dict()`` to
``output``,
which ``MODEL.BACKBONE.WEIGHTS`` loads into the detector (projection heads are not
saved). One JSON line per epoch goes to ``metrics.jsonl`` next to the output; with labels
(Fashion-MNIST) each line carries the kNN top-1 accuracy of the pooled trunk features on
the test split. ``curves.png`` beside it plots the loss (and kNN accuracy) per epoch.

``method="dense"`` trains the detector's own backbone (the trunk with the feature pyramid
of ``returned_stages`` and ``fpn_channels``, built as the detector builds it) with
:class:`~ore.contrastive.methods.DenseContrast`: cells of the two views that cover the
same image location are positives, found from the crops' boxes. ``export="backbone"``
then writes the pyramid too (``backbone.body.*`` and ``backbone.fpn.*``,
:mod:`ore.modeling.backbone_weights`); ``export="trunk"`` (the default) the trunk alone.

Several processes (``torchrun … -m ore pretrain``, methods in
:data:`~ore.contrastive.methods.MULTI_PROCESS_METHODS`): ``batch_size`` is the global
batch, the losses gather every process's features, DDP averages the gradients, and rank
0's clock sets the learning rate and the stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ore.contrastive import distributed as collective
from ore.contrastive.augment import BatchAugment
from ore.contrastive.knn import KNNMonitor
from ore.contrastive.methods import (
    DECOUPLED_METHODS,
    DEFAULT_HEAD,
    DEFAULT_TEMPERATURE,
    DENSE_METHODS,
    METHODS,
    MULTI_CROP_METHODS,
    MULTI_PROCESS_METHODS,
    DenseContrast,
    build_method,
)
from ore.data.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist
from ore.data.images import (
    ImageSet,
    UnreadableImage,
    decode_image,
    load_image_folder,
    resized_image_set,
)
from ore.data.records import find_image, list_path, read_image_list
from ore.engine import distributed as D
from ore.engine.checkpoint import save_torch_file
from ore.engine.metrics_log import FILE as METRICS_FILE
from ore.engine.metrics_log import MetricsLog
from ore.engine.runtime import cosine_lr, resolve_device, seed_everything
from ore.errors import OreError
from ore.fileio import check_output_file
from ore.modeling.backbone import ARCHS, build_fpn_backbone, build_trunk, trunk_out_channels
from ore.modeling.backbone_weights import backbone_state
from ore.modeling.detector import BACKBONES
from ore.vis.plots import plot_curves

log = logging.getLogger(__name__)

DEFAULT_SIZE = 64  # training resolution
# --arch: a trunk, or a detection backbone name (MODEL.BACKBONE.NAME) standing for its trunk.
ARCH_CHOICES = (*ARCHS, *BACKBONES)
ALL_METHODS = (*METHODS, *DENSE_METHODS)
DENSE_FEATURES = ("fpn", "trunk")
EXPORTS = ("trunk", "backbone")


@dataclass
class PretrainOptions:
    """Everything a pretraining run takes (``ore pretrain``'s flags, same names).

    ``None`` means "the default for this method / dataset", resolved by
    :func:`check_options`; ``images`` and ``dataset`` exclude each other.
    """

    method: str = "simclr"
    output: str = ""
    images: str | None = None
    list: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    arch: str = "resnet18"
    epochs: int = 100
    batch_size: int = 256
    minutes: float | None = None
    image_size: int | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 5e-4
    temperature: float | None = None
    head: str | None = None
    decoupled: bool = False
    debiased: float = 0.0
    predictor: bool = False
    symmetric: bool = False
    batch_negatives: bool = False
    out_dim: int = 128
    hidden_dim: int = 512
    queue_size: int | None = None
    momentum: float | None = None
    num_clusters: str | tuple[int, ...] = "100,250,500"
    pcl_recluster_steps: int | None = None
    knn_every: int = 1
    knn_limit: int | None = None
    device: str | None = None
    crop_scale: str | tuple[float, float] | None = None
    jitter: float | None = None
    jitter_prob: float = 0.8
    blur_prob: float = 0.0
    solarize_prob: float = 0.2
    small_crops: int = 0
    small_size: int = 32
    small_crop_scale: str | tuple[float, float] = "0.15,0.4"
    dense_features: str = "fpn"
    dense_weight: float = 0.5
    dense_grid: int = 7
    returned_stages: str | tuple[int, ...] = "1,2,3,4"
    fpn_channels: int = 256
    export: str = "trunk"
    seed: int = 0
    no_progress: bool = False


def check_options(args: PretrainOptions) -> None:
    """Check every option and resolve the defaults that depend on others (in place), so
    that the metrics record what ran. One-line :class:`OreError` for a bad value."""
    if args.method not in ALL_METHODS:
        raise OreError(f"--method: {args.method!r}; expected one of {ALL_METHODS}")
    if args.arch not in ARCH_CHOICES:
        raise OreError(f"--arch: {args.arch!r}; expected one of {ARCH_CHOICES}")
    if sum(x is not None for x in (args.images, args.list, args.dataset)) != 1:
        raise OreError("name exactly one of --images DIR, --list ROOT:LIST and --dataset")
    _check_dense(args)
    if args.pcl_recluster_steps is not None and args.pcl_recluster_steps < 1:
        raise OreError(f"--pcl-recluster-steps must be ≥ 1, got {args.pcl_recluster_steps}")
    for name in ("epochs", "batch_size", "out_dim", "hidden_dim", "queue_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise OreError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise OreError(f"--batch-size must be ≥ 2 for contrastive losses, got {args.batch_size}")
    if args.minutes is not None and args.minutes <= 0:
        raise OreError(f"--minutes must be > 0, got {args.minutes}")
    if args.image_size is not None and args.image_size < 8:
        raise OreError(f"--image-size must be ≥ 8, got {args.image_size}")
    if args.momentum is None:
        # Symmetrised MoCo at 15 minutes on Fashion-MNIST (~10k steps), cosine kNN top-1 of
        # three seeds at 0.995: 85.6, 85.2, 85.3, against 85.2 at 0.99 (one seed); a small
        # gain inside the seed spread. PCL was not measured and keeps 0.99.
        args.momentum = 0.995 if args.method == "moco" else 0.99
    if not 0 <= args.momentum <= 1:
        raise OreError(f"--momentum must be in [0, 1], got {args.momentum}")
    if args.temperature is not None and not args.temperature > 0:
        raise OreError(f"--temperature must be > 0, got {args.temperature}")
    if args.queue_size is None:  # defaults are resolved here so that records show them
        # MoCo enqueues batch keys per step (2×batch when symmetric). For the symmetrised
        # loss a queue of the last 8 steps' keys beat one of 32 steps by 1.8 points of kNN
        # top-1 on Fashion-MNIST (the older keys are stale); one-way MoCo did well with 16.
        args.queue_size = 16 * args.batch_size if args.method == "moco" else 4096
    if args.lr is not None and not args.lr > 0:
        raise OreError(f"--lr must be > 0, got {args.lr}")
    if args.lr is None:
        # Linear scaling only above batch 256: on a fixed CPU budget small batches buy
        # steps, and at batch 64 and 128 lr 0.06 beat the scaled-down 0.015 and 0.03.
        base = 0.06 if args.optimizer == "sgd" else 1e-3
        args.lr = base * max(1.0, args.batch_size / 256)
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE[args.method]
    if args.head is None:
        args.head = DEFAULT_HEAD[args.method]
    try:
        args.num_clusters = tuple(int(k) for k in str(args.num_clusters).split(","))
    except ValueError:
        raise OreError(
            f"--num-clusters: expected comma-separated ints, got {args.num_clusters!r}"
        ) from None
    if min(args.num_clusters) < 2:
        raise OreError(f"--num-clusters must all be ≥ 2, got {args.num_clusters}")
    if args.crop_scale is None:
        args.crop_scale = "0.4,1.0" if args.dataset == "fashion-mnist" else "0.2,1.0"
    args.crop_scale = _scale_range("--crop-scale", args.crop_scale)
    args.small_crop_scale = _scale_range("--small-crop-scale", args.small_crop_scale)
    if args.small_crops < 0:
        raise OreError(f"--small-crops must be ≥ 0, got {args.small_crops}")
    if args.small_size < 8:
        raise OreError(f"--small-size must be ≥ 8, got {args.small_size}")
    if args.small_crops and args.method not in MULTI_CROP_METHODS:
        raise OreError(f"--small-crops: {args.method} has no multi-crop form; use "
                       f"{', '.join(MULTI_CROP_METHODS)}, or --small-crops 0")
    for flag, on, aside in (("--predictor", args.predictor, " (nnclr has its own)"),
                            ("--batch-negatives", args.batch_negatives, ""),
                            ("--symmetric", args.symmetric, "")):
        if on and args.method != "moco":
            raise OreError(f"{flag}: only moco takes it{aside}, not {args.method}")
    if not 0 <= args.debiased < 1:
        raise OreError(f"--debiased must be in [0, 1), got {args.debiased}")
    if args.debiased and args.decoupled:
        raise OreError("--debiased with --decoupled: they are two different denominators; "
                       "choose one")
    for flag, loss, on in (("--decoupled", "decoupled", args.decoupled),
                           ("--debiased", "debiased", args.debiased)):
        if on and args.method not in DECOUPLED_METHODS:
            raise OreError(f"{flag}: {args.method} has no {loss} loss; use "
                           f"{', '.join(DECOUPLED_METHODS)}")
        if on and args.small_crops and args.method == "simclr":
            raise OreError(f"{flag} with --small-crops: SimCLR's multi-crop loss has no "
                           f"{loss} form; drop one of them")
    if args.jitter is None:
        # Grey-level images have only intensity to jitter: on Fashion-MNIST (15 minutes,
        # tiny trunk) SimCLR's kNN top-1 rose from 85.0 / 87.5 at 0.8 to 85.2 / 87.8 at 0.9
        # and 85.5 / 88.2 at 0.95 (cosine / L2).
        args.jitter = 0.95 if args.dataset == "fashion-mnist" else 0.8
    if not 0 <= args.jitter < 1:
        raise OreError(f"--jitter must be in [0, 1), got {args.jitter}")
    for name in ("jitter_prob", "blur_prob", "solarize_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise OreError(f"--{name.replace('_', '-')} must be in [0, 1], "
                           f"got {getattr(args, name)}")
    check_output_file(args.output)


def _check_dense(args: PretrainOptions) -> None:
    dense = args.method in DENSE_METHODS
    try:
        stages = tuple(int(v) for v in str(args.returned_stages).split(","))
    except ValueError:
        raise OreError(f"--returned-stages: expected comma-separated stages 1..4, got "
                       f"{args.returned_stages!r}") from None
    if not stages or list(stages) != sorted(set(stages)) or not set(stages) <= {1, 2, 3, 4}:
        raise OreError(f"--returned-stages: {args.returned_stages!r}; expected increasing "
                       "stages from 1..4, e.g. 2,3,4 (MODEL.BACKBONE.RETURNED_STAGES)")
    if dense and stages[-1] != 4:
        # The pyramid's body then stops before layer4, which the trunk file must hold.
        raise OreError(f"--returned-stages {args.returned_stages}: must end with stage 4")
    args.returned_stages = stages
    if args.fpn_channels < 1:
        raise OreError(f"--fpn-channels must be ≥ 1, got {args.fpn_channels}")
    if args.dense_features not in DENSE_FEATURES:
        raise OreError(f"--dense-features: {args.dense_features!r}; expected one of "
                       f"{DENSE_FEATURES}")
    if not 0 < args.dense_weight <= 1:
        raise OreError(f"--dense-weight must be in (0, 1], got {args.dense_weight}")
    if args.dense_grid < 1:
        raise OreError(f"--dense-grid must be ≥ 1, got {args.dense_grid}")
    if args.export not in EXPORTS:
        raise OreError(f"--export: {args.export!r}; expected one of {EXPORTS}")
    if args.export == "backbone" and not (dense and args.dense_features == "fpn"):
        raise OreError("--export backbone writes a pretrained feature pyramid: it needs "
                       "--method dense with --dense-features fpn")
    if dense and args.small_crops:
        raise OreError("--small-crops: --method dense has no multi-crop form")


def _scale_range(flag: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in str(value).split(","))
    except ValueError:
        raise OreError(
            f"{flag}: expected two comma-separated numbers LO,HI, got {value!r}"
        ) from None
    if not 0 < lo <= hi <= 1:
        raise OreError(f"{flag} must satisfy 0 < LO ≤ HI ≤ 1, got {value!r}")
    return lo, hi


def _load_data(args: PretrainOptions) -> tuple[ImageSet, ImageSet | None]:
    if args.dataset == "fashion-mnist":
        root = Path(args.data_dir) if args.data_dir else FASHION_MNIST_DIR
        return load_fashion_mnist("train", root), load_fashion_mnist("test", root)
    if args.list is not None:
        return load_image_list(args.list, args.image_size or DEFAULT_SIZE), None
    return load_image_folder(args.images, args.image_size or DEFAULT_SIZE), None


def load_image_list(spec: str, size: int) -> ImageSet:
    """The images of a detection dataset's list, ``ROOT:LIST``: the ids of
    ``ROOT/ImageSets/Main/LIST.txt`` (each once), read from ``ROOT/JPEGImages``, resized to
    size×size RGB, unlabelled."""
    root, sep, name = str(spec).rpartition(":")
    if not sep or not root or not name:
        raise OreError(f"--list: expected ROOT:LIST (e.g. runs/toy-data:t1_train), got {spec!r}")
    ids = read_image_list(list_path(Path(root), name))
    if not ids:
        raise OreError(f"--list: {list_path(Path(root), name)} lists no images")
    def read(image_id: str) -> np.ndarray:
        try:
            return decode_image(find_image(Path(root) / "JPEGImages", image_id))
        except UnreadableImage as exc:
            raise OreError(f"--list: {exc}") from None

    return resized_image_set(ids, size, read)


class DenseFeatures(nn.Module):
    """A detection backbone for dense pretraining: images → (the trunk's last map, dense
    maps), the dense maps being the pyramid's levels (its max-pooled extra level left out)
    or, with ``use_fpn=False``, the trunk's last map alone."""

    def __init__(self, backbone: nn.Module, use_fpn: bool):
        super().__init__()
        self.body = backbone.body
        self.fpn = backbone.fpn if use_fpn else None

    def forward(self, x: torch.Tensor):
        feats = self.body(x)  # the returned stages, in order
        last = next(reversed(feats.values()))
        if self.fpn is None:
            return last, [last]
        levels = self.fpn(feats)
        return last, [v for k, v in levels.items() if k != "pool"]


class PooledLast(nn.Module):
    """features → the trunk's last map, average-pooled: [n, C] (for the kNN monitor)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0].mean(dim=(2, 3))


class Preprocess:
    """uint8 [n, C, H, W] → float, 3 channels, normalised with the training set's stats."""

    def __init__(self, images, size: int):
        sample = images[: min(len(images), 10000)].float() / 255
        self.mean = sample.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)
        self.size = size

    def to_unit(self, x):
        return x.float() / 255  # [0, 1], the augmentations' domain

    def normalize(self, x):
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()  # NCHW: see _channels_last

    def eval_view(self, x):
        x = self.to_unit(x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.normalize(x)


def _channels_last(model):
    """Put the convolutions in channels_last, where oneDNN has faster CPU kernels, except
    those with fewer than 16 output channels, such as the tiny trunk's 12-channel stem:
    a channels_last batch norm over 12 channels runs ~4.5× slower than an NCHW one here
    (fwd+bwd 30 against 6.4 ms at 128×12×32×32), +6% SimCLR and MoCo steps per minute.
    An NCHW input and weight keep the stem's output, and so its batch norm, NCHW; the next
    convolution's channels_last weight switches the rest over."""
    model.to(memory_format=torch.channels_last)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.out_channels < 16:
            mod.weight.data = mod.weight.data.contiguous()
    return model


def _dense_method(args: PretrainOptions, trunk_arch: str) -> DenseContrast:
    """The detector's backbone (trunk + pyramid, as the detector builds it) inside
    :class:`DenseContrast`."""
    backbone = build_fpn_backbone(arch=trunk_arch, returned_stages=args.returned_stages,
                                  out_channels=args.fpn_channels)
    use_fpn = args.dense_features == "fpn"
    levels = len(args.returned_stages)
    channels = trunk_out_channels(trunk_arch)
    return DenseContrast(
        DenseFeatures(backbone, use_fpn), channels,
        [args.fpn_channels] * levels if use_fpn else [channels],
        temperature=args.temperature, hidden_dim=args.hidden_dim, out_dim=args.out_dim,
        dense_weight=args.dense_weight, grid=args.dense_grid, head=args.head,
    )


def save_trunk(trunk, output: Path) -> None:
    """Write trunk.state_dict() atomically (a temp file in the same folder, then rename)."""
    save_torch_file({k: v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()},
                output)


def pretrain(args: PretrainOptions) -> dict:
    """Run the training described by ``args``; returns the last metrics record."""
    check_options(args)
    device = resolve_device(args.device, "--device")
    dist_info = D.init_from_env(device)
    device = D.process_device(device, dist_info)
    if dist_info.distributed and args.method not in MULTI_PROCESS_METHODS:
        raise OreError(f"--method {args.method} runs in one process only; several processes "
                       f"(torchrun) work with {', '.join(MULTI_PROCESS_METHODS)}")
    # --batch-size is the global batch; each process takes its share, and the losses
    # gather the other processes' features so that every image sees the global batch.
    local_batch = D.per_process_batch(args.batch_size, dist_info.world_size, "--batch-size")
    seed_everything(args.seed)
    train, test = _load_data(args)
    size = args.image_size or DEFAULT_SIZE
    if args.method == "supcon" and train.labels is None:
        raise OreError("--method supcon needs labels; use --dataset fashion-mnist")
    n = len(train.images)
    if n < args.batch_size:
        raise OreError(f"--batch-size {args.batch_size} is larger than the {n} training images")

    trunk_arch = BACKBONES.get(args.arch, args.arch)
    dense = args.method in DENSE_METHODS
    if dense:
        method = _dense_method(args, trunk_arch)
        trunk, encoder = method.features.body, PooledLast(method.features)
    else:
        trunk = build_trunk(trunk_arch)
    method = method if dense else build_method(
        args.method,
        trunk,
        trunk_out_channels(trunk_arch),
        temperature=args.temperature,
        hidden_dim=args.hidden_dim,
        out_dim=args.out_dim,
        head=args.head,
        queue_size=args.queue_size,
        momentum=args.momentum,
        num_samples=n,
        num_clusters=args.num_clusters,
        recluster_steps=args.pcl_recluster_steps or n // args.batch_size,
        gather_distributed=dist_info.distributed,
        decoupled=args.decoupled,
        debiased=args.debiased,
        predictor=args.predictor,
        batch_negatives=args.batch_negatives,
        symmetric=args.symmetric,
    )
    if not dense:
        encoder = method.encoder
    try:
        method = _channels_last(method.to(device=device))
    except (RuntimeError, AssertionError) as exc:
        raise OreError(f"--device: {args.device!r}: {exc}") from None
    model = D.wrap_model(method, device, dist_info)  # DDP averages gradients over processes
    # One data order for all processes; augmentations (the global stream) differ per process.
    order = torch.Generator().manual_seed(args.seed)
    if dist_info.distributed:
        torch.manual_seed(args.seed + 1_000_003 * dist_info.rank)
    main_process = dist_info.is_main
    prep = Preprocess(train.images, size)
    j = args.jitter
    photometric = dict(jitter=(j, j, j, j / 4), jitter_prob=args.jitter_prob if j > 0 else 0.0,
                       blur_prob=args.blur_prob, solarize_prob=args.solarize_prob)
    augment = BatchAugment(size, scale=args.crop_scale, **photometric)
    small_augment = None
    if args.small_crops:  # the same photometric recipe on smaller, lower-resolution crops
        small_augment = BatchAugment(args.small_size, scale=args.small_crop_scale, **photometric)
    params = [p for p in method.parameters() if p.requires_grad]
    lr = args.lr
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)

    monitor = None
    if main_process and train.labels is not None and test is not None:
        lim = args.knn_limit
        monitor = KNNMonitor(
            train.images[:lim], train.labels[:lim], test.images[:lim], test.labels[:lim],
            transform=lambda x: prep.eval_view(x.to(device)),
        )

    output = Path(args.output)
    metrics_path = output.parent / METRICS_FILE
    # Only rank 0 writes files; a run starts its log afresh.
    metrics = MetricsLog(metrics_path, fresh=True) if main_process else None
    steps_per_epoch = n // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    budget = args.minutes * 60 if args.minutes else None
    train_time = 0.0
    step = 0
    record: dict = {}
    records: list[dict] = []
    log.info("pretraining %s/%s on %d images at %d px, %d steps/epoch, lr %.4g%s",
             args.method, args.arch, n, size, steps_per_epoch, lr,
             f", {dist_info.world_size} processes" if dist_info.distributed else "")
    t0 = time.perf_counter()
    seconds = 0.0  # elapsed() after the latest step

    def elapsed() -> float:
        """Training seconds so far, by rank 0's clock in every process: one learning rate
        and one stopping step for all (DDP replicas must take the same steps)."""
        t = train_time + time.perf_counter() - t0
        if dist_info.distributed:
            t = float(collective.broadcast_tensor(
                torch.tensor([t], dtype=torch.float64, device=device)))
        return t

    def evaluate():
        method.eval()
        try:
            return monitor(encoder)
        finally:
            method.train()

    for epoch in range(args.epochs):
        method.train()
        perm = torch.randperm(n, generator=order)
        losses = []
        out_of_time = False
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or not main_process, leave=False)
        t0 = time.perf_counter()
        for it in bar:
            progress = step / total_steps
            if budget:
                progress = max(progress, seconds / budget)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(progress, lr)
            start = it * args.batch_size + dist_info.rank * local_batch  # this process's share
            idx = perm[start : start + local_batch]
            x = prep.to_unit(train.images[idx].to(device))
            # Both views in one call (independent draws per row): half the small ops.
            views, boxes = augment(torch.cat([x, x]), return_boxes=True)
            x1, x2 = prep.normalize(views).chunk(2)
            small = None
            if small_augment is not None:  # [V·n] view-major, one pass through the trunk
                small = prep.normalize(small_augment(x.repeat(args.small_crops, 1, 1, 1)))
            labels = train.labels[idx].to(device) if train.labels is not None else None
            if dense:
                loss = model(x1, x2, *boxes.chunk(2))
            else:
                loss = model(x1, x2, labels, idx.to(device), small)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at epoch {epoch + 1} step {it}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if it % 10 == 0:
                cur_lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{cur_lr:.3g}")
            if budget:
                seconds = elapsed()
                if seconds >= budget:
                    out_of_time = True
                    break
        bar.close()
        train_time += time.perf_counter() - t0
        last = out_of_time or epoch + 1 == args.epochs
        mean_loss = torch.tensor(sum(losses) / max(1, len(losses)), device=device)
        record = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": float(collective.all_reduce_mean(mean_loss)),  # over processes
            "train_seconds": round(train_time, 1),
        }
        if not main_process:
            if out_of_time:
                break
            continue
        if monitor is not None and (last or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
            record.update(evaluate())
        records.append(record)
        metrics.write(record)
        log.info("%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()))
        if out_of_time:
            log.info("time budget of %.1f min used after %d steps", args.minutes, step)
            break
    if not main_process:
        return record
    metrics.close()
    if args.export == "backbone":
        save_torch_file(backbone_state(method.features.body, method.features.fpn), output)
    else:
        save_trunk(trunk, output)
    curves = output.parent / "curves.png"
    plot_curves(records, curves, f"{args.method}, {args.arch} trunk, {size} px")
    log.info("wrote %s (%s of %s), %s and %s", output,
             "trunk and pyramid" if args.export == "backbone" else "trunk", args.arch,
             metrics_path, curves)
    return record
