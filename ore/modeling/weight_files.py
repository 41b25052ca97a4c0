"""Trunk weight files in the layouts ResNet-50 weights are published in, renamed to ours.

``MODEL.BACKBONE.WEIGHTS`` takes any of these (the format is read from the keys, never
from the file name alone):

============  ==========================================================  ==============
format        what it is                                                  input
============  ==========================================================  ==============
torchvision   torchvision state dict (``conv1.weight``, ``layer1.0.…``):   RGB, 0..1,
              ResNet-50 V1 and V2 weights, ``ore pretrain`` output, the    ImageNet
              DINO ``dino_resnet50_pretrain.pth``                          mean/std
dino          a DINO training checkpoint (``teacher`` / ``student``, keys  as torchvision
              ``module.backbone.…``): the teacher is taken
caffe2        MSRA ``R-50.pkl`` (Detectron): a pickle of numpy blobs       BGR, 0..255,
              ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w`` …     std 1
detectron2    detectron2 names (``stem.conv1.norm.weight``,                BGR 0..255, or
              ``res2.0.conv1.weight``, ``res2.0.shortcut.…``)              RGB when the
                                                                           file's author
                                                                           is torchvision
============  ==========================================================  ==============

Caffe2 stages ``res2``..``res5`` are torchvision's ``layer1``..``layer4``; ``branch2a`` /
``2b`` / ``2c`` are ``conv1`` / ``conv2`` / ``conv3`` and ``branch1`` is ``downsample``.
Caffe2 batch norm is stored frozen, as a scale ``_s`` and a bias ``_b``; the trunk loader
(:func:`ore.modeling.backbone.load_trunk_state`) gives such layers mean 0 and a variance
that makes the layer exactly ``s·x + b``.

``.pkl`` files are read by :func:`read_pickle_weights`, an unpickler that can build numpy
arrays, numpy scalars and plain containers and nothing else, so a crafted file cannot run
code; every other file goes through ``torch.load`` with ``weights_only=True``.
"""

from __future__ import annotations

import collections
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray, numeric  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric

from ore.errors import OreError

SETTING = "MODEL.BACKBONE.WEIGHTS"

# Pixel means of the MSRA / Detectron models in 0..255, RGB order (their files say BGR:
# 103.530, 116.280, 123.675). Divided by 255 they are torchvision's ImageNet means.
MSRA_PIXEL_MEAN_RGB_255 = (123.675, 116.280, 103.530)

# Prefixes that wrappers put in front of trunk keys (DDP, detectron2's FPN, detection
# models, self-supervised models), stripped in this order.
WRAPPER_PREFIXES = ("module.", "backbone.bottom_up.", "backbone.body.", "backbone.", "body.",
                    "trunk.")
# Heads that are not part of a trunk.
HEAD_NAMES = ("fc", "head", "projector", "projection_head", "predictor")


@dataclass(frozen=True)
class TrunkFile:
    """A weights file's trunk, renamed to torchvision keys, and what the file expects.

    Attributes:
        state: torchvision-named tensors (heads and wrapper prefixes removed).
        format: ``torchvision``, ``dino``, ``caffe2`` or ``detectron2``.
        bgr_255: the weights were trained on BGR images in 0..255 with the MSRA means
            subtracted and std 1 (MSRA / Detectron) rather than torchvision's RGB input.
        stride_in_1x1: each strided block puts its stride on the first 1×1 conv (MSRA);
            torchvision ResNets (V1.5) put it on the 3×3 conv.
        affine_norm: norm layers whose file entries are a scale and bias only, with no
            running statistics (frozen caffe2 batch norm), by their torchvision prefix.
        origin: torchvision key -> the key in the file, for messages.
    """

    state: dict[str, torch.Tensor]
    format: str
    bgr_255: bool
    stride_in_1x1: bool
    affine_norm: tuple[str, ...]
    origin: dict[str, str]


# ---------------------------------------------------------------------------------------
# Reading pickles without running anything


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to latin-1: how protocol 2 stores ``bytes`` objects."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for plain numeric types only: an object dtype would hold pickled
    Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy object arrays")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    table = {}
    for module in ("numpy.core", "numpy._core"):
        table[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        # Protocol 5 (Python's default from 3.14) stores arrays as a buffer.
        table[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = _plain_dtype
    for builtins in ("builtins", "__builtin__"):  # Python 3 and Python 2 names
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray)):
            table[(builtins, name)] = obj
    table[("_codecs", "encode")] = _latin1_encode
    table[("collections", "OrderedDict")] = collections.OrderedDict
    return table


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays and plain containers need;
    any other global (``os.system``, ``builtins.eval``, a class) stops the load."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _tensors(obj: Any) -> Any:
    """Numpy arrays (in nested dicts) as CPU tensors in native byte order."""
    if isinstance(obj, np.ndarray):
        arr = np.array(obj, dtype=obj.dtype.newbyteorder("="), copy=True, order="C")
        return torch.from_numpy(arr)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    return obj


def read_pickle_weights(path: str | Path) -> Any:
    """The contents of a ``.pkl`` weights file, numpy arrays turned into tensors.

    Python 2 pickles (the MSRA ``R-50.pkl``) are decoded as latin-1, as Detectron does.
    A file that names any global beyond numpy arrays and plain containers is refused with
    an :class:`OreError` before anything it names is called.
    """
    path = Path(path)
    if not path.exists():
        raise OreError(f"{SETTING}: file not found: {path}")
    try:
        with path.open("rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise OreError(f"{SETTING}: {path} is not a pickle of numpy arrays ({exc}); only "
                       "weights are read from .pkl files, nothing in them is run") from None
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the user's file
        raise OreError(f"{SETTING}: {path} is not a readable pickle "
                       f"({type(exc).__name__}: {exc})") from None
    return _tensors(obj)


# ---------------------------------------------------------------------------------------
# Recognising the layout and renaming to torchvision keys

_CAFFE2_KEY = re.compile(r"^(conv1_w|res_conv1_bn_[sb]|res\d_\d+_branch(1|2[a-c])_)")
_DETECTRON2_KEY = re.compile(r"^(stem\.conv1\.|res\d\.\d+\.(conv\d|shortcut)\.)")
_BRANCH = {"2a": "1", "2b": "2", "2c": "3"}
_SCALE_BIAS = {"s": "weight", "b": "bias", "w": "weight"}


def _caffe2_name(key: str) -> str:
    """torchvision name of a caffe2 blob; unknown blobs keep their name."""
    if key == "conv1_w":
        return "conv1.weight"
    m = re.fullmatch(r"res_conv1_bn_([sb])", key)
    if m:
        return f"bn1.{_SCALE_BIAS[m[1]]}"
    m = re.fullmatch(r"fc1000_([wb])", key)
    if m:
        return f"fc.{_SCALE_BIAS[m[1]]}"
    m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2[abc])_(w|bn_s|bn_b)", key)
    if not m:
        return key
    block = f"layer{int(m[1]) - 1}.{m[2]}"
    part, kind = m[3], m[4]
    if part == "1":
        return f"{block}.downsample.{'0' if kind == 'w' else '1'}.{_SCALE_BIAS[kind[-1]]}"
    n = _BRANCH[part]
    return f"{block}.conv{n}.weight" if kind == "w" else f"{block}.bn{n}.{_SCALE_BIAS[kind[-1]]}"


def _detectron2_name(key: str) -> str:
    """torchvision name of a detectron2 ResNet key; other keys keep their name."""
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", key)
    if m:
        return "conv1.weight" if m[2] is None else f"bn1.{m[2]}"
    m = re.fullmatch(r"stem\.fc\.(\w+)", key)  # detectron2's torchvision converter
    if m:
        return f"fc.{m[1]}"
    m = re.fullmatch(r"res(\d)\.(\d+)\.(conv(\d)|shortcut)\.(weight|norm\.(\w+))", key)
    if not m:
        return key
    block = f"layer{int(m[1]) - 1}.{m[2]}"
    if m[3] == "shortcut":
        return f"{block}.downsample.0.weight" if m[6] is None else f"{block}.downsample.1.{m[6]}"
    return f"{block}.conv{m[4]}.weight" if m[6] is None else f"{block}.bn{m[4]}.{m[6]}"


def _strip(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _unwrap(obj: Any) -> tuple[Any, str, bool]:
    """The dict of weights inside a file's object, the author the file names (detectron2
    writes ``__author__``) and whether it is a DINO training checkpoint (teacher taken)."""
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        return obj["teacher"], "", True
    author = obj.get("__author__") if isinstance(obj, dict) else None
    for key in ("backbone", "state_dict", "model", "blobs"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj, author if isinstance(author, str) else "", False


def read_trunk_file(obj: Any, source: str) -> TrunkFile:
    """Recognise the layout of a weights file's contents and rename them to torchvision
    trunk keys (see the module docstring for the layouts).

    Args:
        obj: what the file held (from ``torch.load`` or :func:`read_pickle_weights`).
        source: the file, for messages.
    """
    obj, author, dino = _unwrap(obj)
    if not isinstance(obj, dict) or not obj:
        raise OreError(f"{SETTING}: {source} holds no state dict (expected a dict of weight "
                       "tensors or numpy arrays)")
    obj = _tensors(obj)
    # Detectron keeps optimiser momenta next to the weights of detection models.
    obj = {k: v for k, v in obj.items() if not str(k).endswith("_momentum")}
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OreError(f"{SETTING}: {source} is not a state dict of tensors: {len(bad)} "
                       f"entries are not arrays (e.g. {bad[0]})")
    stripped = {_strip(str(k)): str(k) for k in obj}
    if len(stripped) != len(obj):
        raise OreError(f"{SETTING}: {source} holds the same weight under two prefixes")
    if any(_CAFFE2_KEY.match(k) for k in stripped):
        fmt, rename = "caffe2", _caffe2_name
    elif any(_DETECTRON2_KEY.match(k) for k in stripped):
        fmt, rename = "detectron2", _detectron2_name
    else:
        fmt, rename = ("dino" if dino else "torchvision"), (lambda k: k)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, original in stripped.items():
        name = rename(key)
        if name.split(".")[0] in HEAD_NAMES:
            continue
        if name in state:
            raise OreError(f"{SETTING}: {source}: {original} and {origin[name]} both map to "
                           f"{name}")
        state[name] = obj[original]
        origin[name] = original
    affine = ()
    if fmt in ("caffe2", "detectron2"):
        # Norm layers given as scale and bias only (frozen caffe2 batch norm).
        affine = tuple(sorted(
            k[: -len(".weight")] for k in state
            if k.endswith(".weight") and re.search(r"(^bn1|\.bn\d|\.downsample\.1)\.weight$", k)
            and k[: -len("weight")] + "running_mean" not in state
            and k[: -len("weight")] + "running_var" not in state
        ))
    msra = fmt == "caffe2" or (fmt == "detectron2" and author.lower() != "torchvision")
    return TrunkFile(state=state, format=fmt, bgr_255=msra, stride_in_1x1=msra,
                     affine_norm=affine, origin=origin)
