"""``ore discover --run RUN IMAGES… --output DIR``: cluster the detections a run labels
unknown, show the clusters as a gallery and export them for labelling and ore add-task."""

from __future__ import annotations

import argparse

from ore.cli.common import add_batch_size, check_batch_size, split_overrides
from ore.cli.detect import model_source
from ore.data.images import collect_images, is_video_file
from ore.engine.detect import check_detect_paths
from ore.engine.discover import (
    CLUSTERS_FILE,
    COCO_FILE,
    DEFAULT_OBJECTNESS,
    GALLERY_HTML,
    NAMES_FILE,
    NAMES_FROM,
    VOC_DIR,
    check_discover_model,
    check_discover_output,
    check_k,
    check_objectness,
    discover,
    parse_k_range,
)
from ore.engine.inference import Predictor
from ore.engine.objectness import run_training_records
from ore.errors import OreError
from ore.fileio import check_output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True,
                   help="a run folder (ore train or ore run-tasks output): its config, final "
                        "weights and energy fit (EBUI on when there is one), as ore detect")
    p.add_argument("--stage", help="the stage folder of a run-tasks run to use (e.g. t2_ft; "
                                   "default: the last finished one)")
    p.add_argument("inputs", nargs="+", metavar="IMAGES|KEY=VALUE",
                   help="image files, folders (searched recursively), glob patterns, and "
                        "config overrides (e.g. EBUI.ENABLED=false)")
    p.add_argument("--output", required=True,
                   help=f"folder for {CLUSTERS_FILE}, {GALLERY_HTML}, the labels and "
                        f"{NAMES_FILE}")
    p.add_argument("--k", type=int, default=None, help="the number of clusters (default: the "
                   "k of --k-range with the highest mean silhouette)")
    p.add_argument("--k-range", default=None, metavar="LOW:HIGH",
                   help="the k searched by silhouette (default 2:12, capped at the number of "
                        "unknown detections − 1)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="keep detections from this score (default: the config's)")
    p.add_argument("--max-per-cluster-gallery", type=int, default=20, metavar="N",
                   help="crops shown per cluster in the gallery, most typical first (20)")
    p.add_argument("--objectness", type=float, default=DEFAULT_OBJECTNESS, metavar="SCORE",
                   help="cluster only detections whose whole-object score reaches SCORE: a "
                        "small network learnt from the run's own labelled training boxes "
                        "tells whole objects from boxes that cut through one or cover "
                        f"background (default {DEFAULT_OBJECTNESS:g}; 0: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the k-means restarts and the whole-object score (0)")
    p.add_argument("--names-majority", metavar="GT_ROOT", default=None,
                   help="a VOC root with the images' ground truth (Annotations/<stem>.xml): "
                        "name each cluster by its members' majority class and write "
                        "purity.json")
    p.add_argument("--names-from", choices=NAMES_FROM, default="members",
                   help="with --names-majority: name a cluster by the majority of all its "
                        "members (default) or of the crops its gallery row shows")
    add_batch_size(p)
    p.set_defaults(config=None, weights=None)  # model_source reads them; discover takes --run


def run(args: argparse.Namespace) -> int:
    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    if args.max_per_cluster_gallery < 1:
        raise OreError(f"--max-per-cluster-gallery {args.max_per_cluster_gallery}: expected ≥ 1")
    check_batch_size(args.batch_size)
    k_range = parse_k_range(args.k_range) if args.k_range is not None else None
    check_k(args.k, k_range)
    check_objectness(args.objectness)
    check_output_dir(args.output)
    inputs, overrides = split_overrides(args.inputs)
    if not inputs:
        raise OreError("no IMAGES given: name image files, folders or patterns")
    cfg, weights = model_source(args, overrides)
    check_discover_model(cfg)
    found = collect_images(inputs)
    paths = [p for p in found if not is_video_file(p)]
    if not paths:
        raise OreError(f"no image among the inputs ({len(found)} videos): discover reads "
                       "image files")
    check_detect_paths([*inputs, *paths], args.output, ())
    check_discover_output(args.output)
    records = (run_training_records(args.run, cfg.OWOD.TASK) if args.objectness > 0
               else None)
    predictor = Predictor(cfg, weights, args.score_thresh)
    summary = discover(predictor, paths, args.output, k=args.k, k_range=k_range,
                       seed=args.seed, batch_size=args.batch_size,
                       gallery_per_cluster=args.max_per_cluster_gallery,
                       ground_truth_root=args.names_majority, objectness=args.objectness,
                       objectness_records=records, names_from=args.names_from)
    how = "given" if summary["criterion"] == "given" else "by silhouette"
    print(f"{summary['images']} images, {summary['clustered']} unknown detections → "
          f"{summary['k']} clusters ({how}) in {args.output}: {GALLERY_HTML}, "
          f"{VOC_DIR}, {COCO_FILE}, {NAMES_FILE}"
          + (f"; {len(summary['unclustered'])} not clustered (too small"
             + (", or under the whole-object score" if args.objectness > 0 else "") + ")"
             if summary["unclustered"] else ""))
    if "purity" in summary:
        print(f"purity against {args.names_majority}: "
              f"{100 * summary['purity']['overall_purity']:.1f}%")
    print(f"next: name the clusters in {args.output}/{NAMES_FILE}, then ore add-task --run "
          f"{args.run} --labels {args.output}/{VOC_DIR} --names {args.output}/{NAMES_FILE}")
    return 0
