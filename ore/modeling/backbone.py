"""Backbones: ResNet trunks and a tiny CNN, each wrapped with a feature pyramid.

A *trunk* is the convolutional body without its classifier. Its state dict keys are the
ones a torchvision ResNet uses (``conv1.*``, ``bn1.*``, ``layer1.*`` … ``layer4.*``) or,
for the tiny CNN, ``stem.*`` and ``layer1.*`` … ``layer4.*``. ``ore pretrain`` writes
exactly these keys and ``MODEL.BACKBONE.WEIGHTS`` loads them, so a pretrained trunk moves
into the detector without renaming.

Nothing here downloads weights: every torchvision builder is called with ``weights=None``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ore.errors import OreError

ARCHS = ("resnet50", "resnet18", "tiny")
NORMS = ("BN", "FrozenBN", "GN")

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


def load_trunk_state(trunk: nn.Module, obj: Any, source: str) -> None:
    """Load trunk weights ``obj`` (as read from the file ``source``) with strict key checks.

    Accepts a plain state dict or a dict with the state dict under ``"model"`` /
    ``"state_dict"`` / ``"backbone"``; keys may carry a ``backbone.body.`` or ``module.``
    prefix. A classifier (``fc.*``) or projection head (``head.*``, ``projector.*``) is
    ignored; any other missing or unexpected key is an error.
    """
    path = source
    for key in ("backbone", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OreError(f"MODEL.BACKBONE.WEIGHTS: {path} is not a state dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.body.", "body.", "trunk."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.split(".")[0] in ("fc", "head", "projector", "projection_head", "predictor"):
            continue
        state[k] = v
    own = trunk.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked; a BN checkpoint's counters are harmless.
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise OreError(
            f"MODEL.BACKBONE.WEIGHTS: {path} does not match the trunk: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise OreError(
                f"MODEL.BACKBONE.WEIGHTS: {path}: {k} has shape {tuple(v.shape)}, "
                f"the trunk expects {tuple(own[k].shape)}"
            )
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


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
    returned_stages: tuple[int, ...] = (1, 2, 3, 4),
    out_channels: int = 256,
) -> BackboneWithFPN:
    """A trunk with a feature pyramid on the chosen stages plus a max-pooled top level.

    ``weights`` are trunk weights already read from the file ``weights_source`` (see
    :func:`load_trunk_state`), loaded before stages are frozen.

    Feature maps are named ``"0"``, ``"1"``, … in stage order and ``"pool"`` for the
    extra level, as torchvision's detection heads expect.
    """
    trunk = build_trunk(arch, norm)
    if weights is not None:
        load_trunk_state(trunk, weights, weights_source)
    freeze_stages(trunk, arch, trainable_layers)
    if not returned_stages or any(s not in (1, 2, 3, 4) for s in returned_stages):
        raise OreError(f"MODEL.BACKBONE.RETURNED_STAGES: {returned_stages} must be in 1..4")
    return_layers = {f"layer{s}": str(i) for i, s in enumerate(returned_stages)}
    in_channels = [STAGE_CHANNELS[arch][s - 1] for s in returned_stages]
    return BackboneWithFPN(
        trunk,
        return_layers=return_layers,
        in_channels_list=in_channels,
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
