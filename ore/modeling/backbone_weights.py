"""Weight files of a whole detection backbone: the trunk and its feature pyramid.

``ore pretrain --method dense --export backbone`` writes the trunk under
``backbone.body.*`` and the pyramid under ``backbone.fpn.*``, the names both take in the
detector's state dict. :func:`split_backbone_state` separates the two parts (a file
without pyramid keys is a trunk file and passes through whole), so that the trunk part
goes through the trunk loader (:func:`ore.modeling.backbone.load_trunk_state`) and the
pyramid part through :func:`load_fpn_state`, both with strict key and shape checks.

This module imports nothing else of the detector, so the backbone builder can use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ore.errors import OreError

SETTING = "MODEL.BACKBONE.WEIGHTS"
BODY_PREFIX = "backbone.body."
FPN_PREFIX = "backbone.fpn."


def backbone_state(trunk: nn.Module, fpn: nn.Module) -> dict[str, torch.Tensor]:
    """The file form of a trunk and its pyramid: detached CPU tensors under the
    detector's names."""
    state = {BODY_PREFIX + k: v for k, v in trunk.state_dict().items()}
    state.update({FPN_PREFIX + k: v for k, v in fpn.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def has_fpn_weights(obj: Any) -> bool:
    """True when ``obj`` is a state dict that holds feature-pyramid weights."""
    return isinstance(obj, dict) and any(
        isinstance(k, str) and k.startswith(FPN_PREFIX) for k in obj)


def split_backbone_state(obj: Any, source: str) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """``(trunk part, pyramid part)`` of a weights file's contents.

    Without ``backbone.fpn.*`` keys the file is a trunk file: ``(obj, None)``, left to the
    trunk loader as it is. With them, every key must be ``backbone.body.*`` or
    ``backbone.fpn.*`` (an :class:`OreError` lists any other), and the prefixes are
    stripped: the trunk part has the trunk's own key names.
    """
    if not has_fpn_weights(obj):
        return obj, None
    other = [k for k in obj if not (isinstance(k, str)
                                    and k.startswith((BODY_PREFIX, FPN_PREFIX)))]
    if other:
        raise OreError(f"{SETTING}: {source} holds feature-pyramid weights ({FPN_PREFIX}*), so "
                       f"every key must start with {BODY_PREFIX} or {FPN_PREFIX}; "
                       f"{len(other)} do not: " + ", ".join(map(str, other[:5])))
    trunk = {k[len(BODY_PREFIX):]: v for k, v in obj.items() if k.startswith(BODY_PREFIX)}
    if not trunk:
        raise OreError(f"{SETTING}: {source} holds feature-pyramid weights but no trunk "
                       f"({BODY_PREFIX}*) weights")
    fpn = {k[len(FPN_PREFIX):]: v for k, v in obj.items() if k.startswith(FPN_PREFIX)}
    return trunk, fpn


def load_fpn_state(fpn: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load pyramid weights (keys without the ``backbone.fpn.`` prefix) strictly: every
    missing or unexpected key and every tensor of another shape is listed in one
    :class:`OreError` (the pyramid's stages and width must be the detector's:
    ``MODEL.BACKBONE.RETURNED_STAGES`` and ``FPN_CHANNELS``)."""
    own = fpn.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} has {tuple(v.shape)}, the pyramid {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {FPN_PREFIX}{k}" for k in missing]
        parts += [f"unexpected {FPN_PREFIX}{k}" for k in unexpected]
        parts += [FPN_PREFIX + w for w in wrong]
        raise OreError(f"{SETTING}: {source}: the feature-pyramid weights do not match this "
                       "pyramid (check MODEL.BACKBONE.RETURNED_STAGES and FPN_CHANNELS "
                       "against the pretraining's --returned-stages and --fpn-channels): "
                       + "; ".join(parts))
    fpn.load_state_dict(state)
