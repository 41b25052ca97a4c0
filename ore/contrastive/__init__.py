"""Contrastive representation learning: losses, heads, queues, momentum updates, k-means,
augmentations, a kNN monitor, and the pretraining methods built from them.

One loss per module, each an ``nn.Module`` whose docstring states its formula. All
losses reduce with logsumexp in fp32 (also under bf16 autocast) and stay finite at
temperature 0.01; none assumes a device or a process group except through the optional
gather in :mod:`ore.contrastive.distributed`. The package imports nothing else of ORE,
so it could ship on its own; :mod:`ore.engine.pretrain` trains a backbone trunk with it.
"""

from __future__ import annotations

from ore.contrastive.augment import BatchAugment, simclr_transforms
from ore.contrastive.bilinear import BilinearInfoNCELoss
from ore.contrastive.clip import CLIPLoss
from ore.contrastive.clustering import kmeans
from ore.contrastive.dense import DenseInfoNCELoss, match_cells
from ore.contrastive.distributed import all_gather, all_gather_no_grad
from ore.contrastive.heads import PredictionHead, ProjectionHead
from ore.contrastive.infonce import InfoNCELoss, info_nce
from ore.contrastive.knn import KNNMonitor, knn_accuracy, knn_predict
from ore.contrastive.max_margin import MaxMarginContrastiveLoss
from ore.contrastive.memory import FeatureQueue, momentum_update, nearest_neighbour
from ore.contrastive.moco import MoCo
from ore.contrastive.nnclr import NNCLRLoss
from ore.contrastive.npair import NPairLoss
from ore.contrastive.ntxent import NTXentLoss
from ore.contrastive.protonce import ProtoNCELoss
from ore.contrastive.supcon import SupConLoss
from ore.contrastive.triplet import TripletLoss

__all__ = [
    "BatchAugment", "BilinearInfoNCELoss", "CLIPLoss", "DenseInfoNCELoss", "FeatureQueue",
    "InfoNCELoss",
    "KNNMonitor", "MaxMarginContrastiveLoss", "MoCo", "NNCLRLoss", "NPairLoss", "NTXentLoss",
    "PredictionHead", "ProjectionHead", "ProtoNCELoss", "SupConLoss", "TripletLoss",
    "all_gather", "all_gather_no_grad", "info_nce", "kmeans", "knn_accuracy", "knn_predict",
    "match_cells", "momentum_update", "nearest_neighbour", "simclr_transforms",
]
