"""Backbones: ResNet trunks and a tiny CNN, each wrapped with a feature pyramid.

A *trunk* is the convolutional body without its classifier. Its state dict keys are the
ones a torchvision ResNet uses (``conv1.*``, ``bn1.*``, ``layer1.*`` … ``layer4.*``) or,
for the tiny CNN, ``stem.*`` and ``layer1.*`` … ``layer4.*``. ``ore pretrain`` writes
exactly these keys and ``MODEL.BACKBONE.WEIGHTS`` loads them, so a pretrained trunk moves
into the detector without renaming. Published ResNet-50 weights in other layouts (MSRA
caffe2 ``R-50.pkl``, detectron2, DINO checkpoints) are renamed on loading; see
:mod:`ore.modeling.weight_files`.

Nothing here downloads weights: every torchvision builder is called with ``weights=None``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ore.errors import OreError
from ore.modeling.backbone_weights import load_fpn_state, split_backbone_state
from ore.modeling.weight_files import MSRA_PIXEL_MEAN_RGB_255, SETTING, TrunkFile, read_trunk_file

log = logging.getLogger(__name__)

ARCHS = ("resnet50", "resnet18", "tiny")
NORMS = ("BN", "FrozenBN", "GN")
# The default INPUT.PIXEL_MEAN / INPUT.PIXEL_STD (RGB, 0..1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Output channels of each stage (layer1..layer4) per trunk.
STAGE_CHANNELS = {
    "resnet50": (256, 512, 1024, 2048),
    "resnet18": (64, 128, 256, 512),
    "tiny": (24, 48, 64, 96),
}


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """Return a ``channels -> module`` factory for a normalisation name."""
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "GN":
        # Groups of at most 32 that divide the channel count (the tiny CNN has 16-channel stages).
        return lambda c: nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0), c)
    raise OreError(f"MODEL.BACKBONE.NORM: unknown value {norm!r}; expected one of {NORMS}")


def _conv_norm_relu(cin: int, cout: int, stride: int, norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class TinyTrunk(nn.Module):
    """A five-stage CNN for CPU work: strides 2, 4, 8, 16, 32; ~0.15 M parameters.

    The stem and ``layer1`` are one strided 3×3 conv each (full-resolution layers are
    where a CPU spends its time); ``layer2``–``layer4`` add a second 3×3 conv. Every conv
    has norm and ReLU. Children are in forward order so that ``IntermediateLayerGetter``
    can tap any stage.
    """

    def __init__(self, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        c1, c2, c3, c4 = STAGE_CHANNELS["tiny"]
        self.stem = _conv_norm_relu(3, 12, 2, norm_layer)
        self.layer1 = _conv_norm_relu(12, c1, 2, norm_layer)
        self.layer2 = nn.Sequential(
            _conv_norm_relu(c1, c2, 2, norm_layer), _conv_norm_relu(c2, c2, 1, norm_layer)
        )
        self.layer3 = nn.Sequential(
            _conv_norm_relu(c2, c3, 2, norm_layer), _conv_norm_relu(c3, c3, 1, norm_layer)
        )
        self.layer4 = nn.Sequential(
            _conv_norm_relu(c3, c4, 2, norm_layer), _conv_norm_relu(c4, c4, 1, norm_layer)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x


def build_trunk(arch: str, norm: str = "BN") -> nn.Module:
    """Build a trunk (no classifier) whose forward returns the last feature map.

    Args:
        arch: ``resnet50``, ``resnet18`` or ``tiny``.
        norm: ``BN``, ``FrozenBN`` or ``GN``.
    """
    norm_layer = norm_layer_factory(norm)
    if arch == "tiny":
        return TinyTrunk(norm_layer)
    if arch in ("resnet50", "resnet18"):
        resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer)
        # Keep torchvision's key names; the head is not part of a trunk.
        resnet.fc = nn.Identity()
        resnet.avgpool = nn.Identity()
        return _ResNetTrunk(resnet)
    raise OreError(f"unknown backbone architecture {arch!r}; expected one of {ARCHS}")


class _ResNetTrunk(nn.Sequential):
    """A torchvision ResNet's stem and stages as a sequence with the original key names."""

    def __init__(self, resnet: nn.Module):
        super().__init__(
            OrderedDict(
                (name, getattr(resnet, name))
                for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                             "layer4")
            )
        )


def trunk_out_channels(arch: str) -> int:
    """Channels of the trunk's last feature map."""
    return STAGE_CHANNELS[arch][-1]


def set_stride_in_1x1(trunk: nn.Module) -> int:
    """Move each strided bottleneck's stride from its 3×3 conv to its first 1×1 conv.

    torchvision's ResNet (V1.5) strides the 3×3 conv; the MSRA ResNets (caffe2, Detectron,
    detectron2's ``STRIDE_IN_1X1``) stride the 1×1 conv. Output sizes are the same either
    way, so the switch changes what the weights compute, not the trunk's shapes. Returns
    the number of blocks changed.
    """
    changed = 0
    for block in trunk.modules():
        if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
            changed += 1
    return changed


def _fill_affine_norm(trunk: nn.Module, trunk_file: TrunkFile, source: str) -> dict:
    """Running statistics for norm layers the file gives as scale and bias only: mean 0 and
    variance ``1 - eps``, so that ``(x - 0) / sqrt(var + eps) · s + b`` is exactly
    ``s·x + b`` in both ``BatchNorm2d`` and ``FrozenBatchNorm2d`` (eps 1e-5 in both)."""
    state = dict(trunk_file.state)
    for prefix in trunk_file.affine_norm:
        try:
            norm = trunk.get_submodule(prefix)
        except AttributeError:
            continue  # reported as an unexpected key
        if not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            raise OreError(
                f"{SETTING}: {source} holds frozen batch norm (scale and bias only, "
                f"{trunk_file.format} layout), which a {type(norm).__name__} trunk cannot "
                "take: set MODEL.BACKBONE.NORM to FrozenBN (or BN)"
            )
        weight = state[f"{prefix}.weight"]
        state[f"{prefix}.running_mean"] = torch.zeros_like(weight)
        state[f"{prefix}.running_var"] = torch.full_like(weight, 1.0 - norm.eps)
    return state


def _named(trunk_file: TrunkFile, key: str) -> str:
    """A trunk key with the file's name for it when that differs."""
    original = trunk_file.origin.get(key, key)
    return key if original == key else f"{key} (file key {original})"


def _mismatch_message(source: str, trunk_file: TrunkFile, missing: list[str],
                      unexpected: list[str]) -> str:
    lines = [f"missing {k}" for k in missing]
    lines += [f"unexpected {_named(trunk_file, k)}" for k in unexpected]
    return (f"{SETTING}: {source} ({trunk_file.format} layout) does not match the trunk: "
            f"{len(missing)} missing keys, {len(unexpected)} unexpected keys: "
            + "; ".join(lines))


def load_trunk_state(
    trunk: nn.Module,
    obj: Any,
    source: str,
    *,
    pixel_mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    pixel_std: tuple[float, ...] | list[float] = IMAGENET_STD,
) -> TrunkFile:
    """Load trunk weights ``obj`` (as read from the file ``source``) with strict key checks.

    The layout is recognised from the keys (:func:`ore.modeling.weight_files.read_trunk_file`):
    torchvision state dicts (ResNet-50 V1 and V2, ``ore pretrain`` output, DINO's
    ``dino_resnet50_pretrain.pth``), DINO training checkpoints (the teacher), the MSRA
    caffe2 ``R-50.pkl`` and detectron2 names. A plain state dict may sit under
    ``"model"`` / ``"state_dict"`` / ``"backbone"``; keys may carry a ``module.``,
    ``backbone.`` or ``backbone.body.`` prefix. A classifier (``fc.*``) or projection head
    (``head.*``, ``projector.*``) is ignored; any other missing or unexpected key is an
    error that lists every such key.

    MSRA weights (caffe2, and detectron2 files not converted from torchvision) expect BGR
    images in 0..255 with the MSRA means subtracted and std 1, and stride their blocks on
    the first 1×1 conv. Both are made to match this trunk exactly: conv1's input channels
    are reordered to RGB and scaled by ``255 · pixel_std`` (its means, divided by 255, are
    ImageNet's, so ``pixel_mean`` must be those), and :func:`set_stride_in_1x1` moves the
    strides. A warning names the input settings (``INPUT.PIXEL_MEAN`` /
    ``INPUT.PIXEL_STD``) the converted weights are for. Their frozen batch norm becomes
    mean 0, variance ``1 - eps``; in a ``BN`` trunk that is exact in eval mode only, while
    training normalises with batch statistics (``FrozenBN`` keeps the MSRA affine).

    Args:
        pixel_mean, pixel_std: the RGB normalisation (0..1 scale) the detector applies.

    Returns:
        The recognised file (layout, input convention), for the caller to record.
    """
    trunk_file = read_trunk_file(obj, source)
    state = _fill_affine_norm(trunk, trunk_file, source)
    own = trunk.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked; a BN checkpoint's counters are harmless.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise OreError(_mismatch_message(source, trunk_file, missing, unexpected))
    # Only the file's own tensors: running statistics made up for them follow their shape.
    wrong = [f"{_named(trunk_file, k)} has {tuple(v.shape)}, the trunk {tuple(own[k].shape)}"
             for k, v in trunk_file.state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise OreError(f"{SETTING}: {source} ({trunk_file.format} layout): {len(wrong)} "
                       f"tensors have the wrong shape: " + "; ".join(wrong))
    if trunk_file.bgr_255:
        state["conv1.weight"] = _msra_conv1_to_rgb(state["conv1.weight"], pixel_mean,
                                                   pixel_std, source)
    if trunk_file.stride_in_1x1:
        set_stride_in_1x1(trunk)
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if trunk_file.bgr_255:
        log.warning(
            "%s: %s holds MSRA ResNet weights (%s layout: BGR input in 0..255, std 1, stride "
            "on the 1x1 conv); converted for RGB input normalised with INPUT.PIXEL_MEAN %s "
            "and INPUT.PIXEL_STD %s, blocks strided on the 1x1 conv: keep these INPUT "
            "values and this MODEL.BACKBONE.WEIGHTS for every model built from it",
            SETTING, source, trunk_file.format, _fmt(pixel_mean), _fmt(pixel_std))
    else:
        log.info("%s: %s loaded (%s layout, %d tensors)", SETTING, source, trunk_file.format,
                 len(trunk_file.state))
    return trunk_file


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def _msra_conv1_to_rgb(weight: torch.Tensor, pixel_mean, pixel_std, source: str
                       ) -> torch.Tensor:
    """conv1 of an MSRA model (BGR, 0..255, means subtracted) for RGB input normalised as
    ``(x - pixel_mean) / pixel_std`` in 0..1: the MSRA input is ``255 · pixel_std · z``
    channel-reversed, for ``z`` the normalised RGB input, when ``255 · pixel_mean`` are the
    MSRA means. conv1 has no bias and zero padding stays zero, so the change is exact."""
    mean = torch.tensor([float(v) for v in pixel_mean], dtype=torch.float64)
    std = torch.tensor([float(v) for v in pixel_std], dtype=torch.float64)
    msra = torch.tensor(MSRA_PIXEL_MEAN_RGB_255, dtype=torch.float64)
    if mean.shape != (3,) or std.shape != (3,) or (mean * 255 - msra).abs().max() > 0.05:
        raise OreError(
            f"{SETTING}: {source} holds MSRA weights, trained with the pixel means "
            f"{list(MSRA_PIXEL_MEAN_RGB_255)} (RGB, 0..255); INPUT.PIXEL_MEAN {_fmt(pixel_mean)}"
            f" differs: set INPUT.PIXEL_MEAN to [0.485, 0.456, 0.406]"
        )
    scale = (255.0 * std).to(weight.dtype)
    return weight.flip(1) * scale.view(1, 3, 1, 1)


def freeze_stages(trunk: nn.Module, arch: str, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages (0..5, 5 = train everything)."""
    if not 0 <= trainable_layers <= 5:
        raise OreError(f"MODEL.BACKBONE.TRAINABLE_LAYERS: {trainable_layers} is not in 0..5")
    stem = ["stem"] if arch == "tiny" else ["conv1", "bn1"]
    order = ["layer4", "layer3", "layer2", "layer1", *stem]
    trainable = set(order[:trainable_layers])
    for name, module in trunk.named_children():
        if name not in trainable and name in order:
            for p in module.parameters():
                p.requires_grad_(False)


def build_fpn_backbone(
    *,
    arch: str,
    norm: str = "BN",
    weights: Any = None,
    weights_source: str = "",
    trainable_layers: int = 5,
    pixel_mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    pixel_std: tuple[float, ...] | list[float] = IMAGENET_STD,
    returned_stages: tuple[int, ...] = (1, 2, 3, 4),
    out_channels: int = 256,
) -> BackboneWithFPN:
    """A trunk with a feature pyramid on the chosen stages plus a max-pooled top level.

    ``weights`` are trunk weights already read from the file ``weights_source`` (see
    :func:`load_trunk_state`), or trunk and pyramid weights under the detector's names
    (``backbone.body.*``, ``backbone.fpn.*``), loaded before stages are frozen; ``pixel_mean`` /
    ``pixel_std`` are the input normalisation, which MSRA weights are converted to.

    Feature maps are named ``"0"``, ``"1"``, … in stage order and ``"pool"`` for the
    extra level, as torchvision's detection heads expect.
    """
    trunk = build_trunk(arch, norm)
    fpn_weights = None
    if weights is not None:
        # A trunk + pyramid file (``ore pretrain --export backbone``) loads both.
        weights, fpn_weights = split_backbone_state(weights, weights_source)
        load_trunk_state(trunk, weights, weights_source, pixel_mean=pixel_mean,
                         pixel_std=pixel_std)
    freeze_stages(trunk, arch, trainable_layers)
    if not returned_stages or any(s not in (1, 2, 3, 4) for s in returned_stages):
        raise OreError(f"MODEL.BACKBONE.RETURNED_STAGES: {returned_stages} must be in 1..4")
    return_layers = {f"layer{s}": str(i) for i, s in enumerate(returned_stages)}
    in_channels = [STAGE_CHANNELS[arch][s - 1] for s in returned_stages]
    backbone = BackboneWithFPN(
        trunk,
        return_layers=return_layers,
        in_channels_list=in_channels,
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    if fpn_weights is not None:
        load_fpn_state(backbone.fpn, fpn_weights, weights_source)
    return backbone
