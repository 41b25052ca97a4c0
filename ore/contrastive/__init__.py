"""Contrastive representation learning: losses, momentum machinery, and pretraining.

One loss per module, each an ``nn.Module`` whose docstring states its formula. All
losses reduce with logsumexp in fp32 (also under bf16 autocast) and stay finite at
temperature 0.01; none assumes a device or a process group except through the optional
gather in :mod:`ore.contrastive.distributed`. ``ore pretrain`` (:mod:`.pretrain`) trains
a backbone trunk with them.

Exports load lazily (PEP 562), so importing ``ore.contrastive.pretrain`` for the command
line's argument parser does not import torch.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it
_EXPORTS = {
    "BatchAugment": "augment",
    "BilinearInfoNCELoss": "bilinear",
    "CLIPLoss": "clip",
    "FeatureQueue": "memory",
    "InfoNCELoss": "infonce",
    "KNNMonitor": "knn",
    "MaxMarginContrastiveLoss": "max_margin",
    "MoCo": "moco",
    "NNCLRLoss": "nnclr",
    "NPairLoss": "npair",
    "NTXentLoss": "ntxent",
    "PredictionHead": "heads",
    "ProjectionHead": "heads",
    "ProtoNCELoss": "protonce",
    "SupConLoss": "supcon",
    "TripletLoss": "triplet",
    "all_gather": "distributed",
    "all_gather_no_grad": "distributed",
    "info_nce": "infonce",
    "kmeans": "clustering",
    "knn_accuracy": "knn",
    "knn_predict": "knn",
    "momentum_update": "memory",
    "nearest_neighbour": "memory",
    "simclr_transforms": "augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
