"""``ore pretrain``: contrastive pretraining of a backbone trunk (:mod:`ore.engine.pretrain`).

Example (Fashion-MNIST, 15 CPU minutes, the tiny trunk)::

    ore pretrain --method simclr --dataset fashion-mnist --arch tiny --batch-size 64 \\
        --minutes 15 --output runs/simclr/trunk.pth

Dense pretraining of the toy detector's backbone on its own task-1 training images::

    ore pretrain --method dense --list runs/toy-data:t1_train --arch tiny_fpn \\
        --returned-stages 2,3,4 --fpn-channels 48 --image-size 128 --batch-size 32 \\
        --minutes 4 --export backbone --output runs/dense/backbone.pth
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ore.engine.pretrain import (
    ALL_METHODS,
    ARCH_CHOICES,
    DEFAULT_SIZE,
    DENSE_FEATURES,
    EXPORTS,
    PretrainOptions,
    pretrain,
)

DEFAULTS = PretrainOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=ALL_METHODS, required=True,
                        help="an image-level method, or dense: cell-level contrast between "
                             "the views' overlapping regions on the detector's backbone")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of unlabelled images (recursive)")
    src.add_argument("--list", metavar="ROOT:LIST",
                     help="the images of a detection dataset's list: the ids in "
                          "ROOT/ImageSets/Main/LIST.txt, read from ROOT/JPEGImages "
                          "(e.g. runs/toy-data:t1_train); labels are not read")
    src.add_argument("--dataset", choices=("fashion-mnist",), help="a built-in labelled dataset")
    parser.add_argument("--data-dir", metavar="DIR", help="where the dataset's idx files are "
                        "(default: the dataset-fashion-mnist package's folder)")
    parser.add_argument("--arch", choices=ARCH_CHOICES, default=DEFAULTS.arch,
                        help="the trunk; a detection backbone name (MODEL.BACKBONE.NAME) "
                             "stands for its trunk")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--output", required=True, metavar="FILE", help="trunk state dict (.pth)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop training after this much wall time (the LR schedule "
                             "follows whichever of epochs and time runs out first)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"training resolution (default {DEFAULT_SIZE}; fashion-mnist's "
                             "28-px images are upsampled, which the tiny trunk's strided stem "
                             "needs)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=DEFAULTS.optimizer,
                        help="SGD with momentum 0.9, or AdamW")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate "
                             "(default: SGD 0.06, AdamW 1e-3, scaled by batch/256 above 256)")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--temperature", type=float, default=None,
                        help="default per method: pcl 0.2, the others 0.1")
    parser.add_argument("--head", choices=("mlp", "linear", "none"), default=None,
                        help="projection head: the method's MLP, one linear layer, or none "
                             "(the loss on the pooled trunk features themselves); "
                             "default moco linear, the others mlp")
    parser.add_argument("--decoupled", action="store_true",
                        help="simclr, moco: DCL's loss, without the positive in the "
                             "denominator (Yeh et al., 2022)")
    parser.add_argument("--debiased", type=float, default=DEFAULTS.debiased, metavar="TAU_PLUS",
                        help="simclr, moco: the debiased loss (Chuang et al., 2020) with class "
                             "prior TAU_PLUS, the chance that a negative shares the anchor's "
                             "class (0.1 for ten balanced classes); 0: off")
    parser.add_argument("--predictor", action="store_true",
                        help="moco: MoCo v3's MLP predictor on the queries")
    parser.add_argument("--symmetric", action="store_true",
                        help="moco: MoCo v3's symmetrised loss, each view once the query and "
                             "once the key (twice the images per step); default: v1/v2's loss, "
                             "view 1 the queries and view 2 the keys")
    parser.add_argument("--batch-negatives", action="store_true",
                        help="moco: this batch's keys of the other images as extra "
                             "negatives, beside the queue")
    parser.add_argument("--out-dim", type=int, default=DEFAULTS.out_dim,
                        help="projection dimension")
    parser.add_argument("--hidden-dim", type=int, default=DEFAULTS.hidden_dim,
                        help="projection head width")
    parser.add_argument("--queue-size", type=int, default=None,
                        help="queue of negatives (moco, pcl) or support set (nnclr); default "
                             "moco 16×batch (the keys of the last 16 steps, 8 with --symmetric), "
                             "pcl/nnclr 4096")
    parser.add_argument("--momentum", type=float, default=None,
                        help="key-encoder momentum (moco, pcl); default moco 0.995, pcl 0.99")
    parser.add_argument("--num-clusters", default=DEFAULTS.num_clusters, help="pcl k-means sizes")
    parser.add_argument("--pcl-recluster-steps", type=int, default=None,
                        help="pcl: k-means every N steps (default: once per epoch)")
    parser.add_argument("--knn-every", type=int, default=DEFAULTS.knn_every,
                        help="kNN monitor every N epochs when labels exist (0: only at the end)")
    parser.add_argument("--knn-limit", type=int, default=None,
                        help="use at most this many bank and test images in the kNN monitor")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--crop-scale", default=None, metavar="LO,HI",
                        help="random resized crop: range of the crop's area fraction "
                             "(default 0.4,1 for fashion-mnist, 0.2,1 for image folders)")
    parser.add_argument("--jitter", type=float, default=None,
                        help="colour jitter strength (brightness, contrast, saturation; "
                             "hue is a quarter of it), applied with probability "
                             "--jitter-prob; 0 turns jitter off (default 0.95 for "
                             "fashion-mnist, 0.8, SimCLR's, for image folders)")
    parser.add_argument("--jitter-prob", type=float, default=DEFAULTS.jitter_prob,
                        help="probability of colour jitter (SimCLR's 0.8)")
    parser.add_argument("--blur-prob", type=float, default=DEFAULTS.blur_prob,
                        help="probability of a Gaussian blur")
    parser.add_argument("--solarize-prob", type=float, default=DEFAULTS.solarize_prob,
                        help="probability of solarisation (BYOL); with intensity jitter it "
                             "keeps grey-level crops from matching by their histogram")
    parser.add_argument("--small-crops", type=int, default=DEFAULTS.small_crops, metavar="V",
                        help="multi-crop (SwAV): V extra low-resolution crops per image "
                             "(simclr, moco, supcon)")
    parser.add_argument("--small-size", type=int, default=DEFAULTS.small_size,
                        help="side length of the --small-crops views")
    parser.add_argument("--small-crop-scale", default=DEFAULTS.small_crop_scale, metavar="LO,HI",
                        help="area fraction range of the --small-crops views")
    parser.add_argument("--dense-features", choices=DENSE_FEATURES,
                        default=DEFAULTS.dense_features,
                        help="dense: the loss on every pyramid level (fpn; the pyramid is "
                             "trained too) or on the trunk's last map (trunk)")
    parser.add_argument("--dense-weight", type=float, default=DEFAULTS.dense_weight,
                        help="dense: weight λ of the dense loss; 1 − λ goes to SimCLR's "
                             "global loss on the pooled trunk (DenseCL's 0.5; 1: dense only)")
    parser.add_argument("--dense-grid", type=int, default=DEFAULTS.dense_grid,
                        help="dense: maps are average-pooled to at most G×G cells before "
                             "the loss (its logits are [cells, cells] of the whole batch)")
    parser.add_argument("--returned-stages", default=DEFAULTS.returned_stages,
                        metavar="S,S,…",
                        help="dense: the trunk stages the pyramid takes, ending with 4; "
                             "the detector's MODEL.BACKBONE.RETURNED_STAGES (toy: 2,3,4)")
    parser.add_argument("--fpn-channels", type=int, default=DEFAULTS.fpn_channels,
                        help="dense: pyramid width, the detector's MODEL.BACKBONE.FPN_CHANNELS "
                             "(toy: 48)")
    parser.add_argument("--export", choices=EXPORTS, default=DEFAULTS.export,
                        help="what --output holds: the trunk's state dict, or (dense with "
                             "fpn features) the trunk and the pyramid under the detector's "
                             "names backbone.body.* and backbone.fpn.*")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options(args: argparse.Namespace) -> PretrainOptions:
    """The parsed flags as the engine's options."""
    return PretrainOptions(**{f.name: getattr(args, f.name) for f in fields(PretrainOptions)})


def run(args: argparse.Namespace) -> int:
    pretrain(options(args))
    return 0
