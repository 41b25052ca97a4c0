"""Inference speed of ``ore detect`` on the CPU: images per second, model alone and end to end.

Two detectors: the toy model (a trained run folder with ``--run``, e.g. ``runs/demo/ore``;
otherwise the untrained toy config, which runs the same layers), and ResNet-50-FPN with the
ORE head at the M-OWODB test size (shortest side 800, at most 1333; untrained weights: the
time does not depend on their values). For each, on the toy world's test images:

- *model*: ``Predictor.predict`` on decoded images (resize, forward, post-processing, EBUI
  when the run has an energy fit), batch 1;
- *end to end*: ``detect_images`` on a folder (decode, detect, draw, write the drawn JPEGs
  and detections.json);
- *ratio*: ORE head / standard head, the same backbone and weights, timed alternately in
  this process (what the ORE head costs at inference).

    python tools/bench_detect_speed.py --run runs/demo/ore       # after make demo
    python tools/bench_detect_speed.py --only toy --images 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import torch  # noqa: E402

from ore.config import config_to_yaml, load_config  # noqa: E402
from ore.data.classes import load_task_split  # noqa: E402
from ore.data.toy import write_toy_world  # noqa: E402
from ore.engine.detect import detect_images  # noqa: E402
from ore.engine.inference import Predictor  # noqa: E402
from ore.engine.layout import find_run_stage  # noqa: E402
from ore.modeling.detector import build_detector  # noqa: E402

R50 = ("owod/t1_train.yaml", ["MODEL.BACKBONE.WEIGHTS=", "DATASETS.CLASSES=toy"])


def _save_untrained(cfg, path: Path) -> str:
    torch.manual_seed(0)
    model = build_detector(cfg, load_task_split(cfg.DATASETS.CLASSES))
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _standard_weights(cfg, ore_weights: str, path: Path) -> str:
    """The ORE checkpoint's weights for the standard head (its own buffers left out)."""
    model = build_detector(cfg, load_task_split(cfg.DATASETS.CLASSES))
    ckpt = torch.load(ore_weights, map_location="cpu", weights_only=True)
    keep = model.state_dict().keys()
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k in keep}
    torch.save(ckpt, path)
    return str(path)


def bench(name: str, cfg, weights: str, images: list[Path], tmp: Path) -> None:
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in images]
    predictors = {}
    for head in ("standard", "ore"):
        over = [f"MODEL.ROI_HEADS.NAME={head}"]
        c = load_config_from(cfg, over + ["EBUI.ENABLED=false"] * (head == "standard"))
        predictors[head] = Predictor(c, weights if head == "ore" else
                                     _standard_weights(c, weights, tmp / f"{name}-std.pth"))
    ebui = getattr(predictors["ore"].model.roi_heads, "relabeller", None) is not None
    # The model alone, the two heads alternately (neither gets a warmer cache).
    times = {"standard": [], "ore": []}
    for i, im in enumerate([rgb[0], *rgb]):
        for head in (("standard", "ore") if i % 2 else ("ore", "standard")):
            t0 = time.perf_counter()
            predictors[head].predict([im])
            if i:
                times[head].append(time.perf_counter() - t0)
    s, o = statistics.median(times["standard"]), statistics.median(times["ore"])
    folder = tmp / f"in-{name}"
    folder.mkdir()
    for p in images:
        (folder / p.name).symlink_to(p.resolve())
    t0 = time.perf_counter()
    detect_images(predictors["ore"], sorted(folder.iterdir()), tmp / f"out-{name}",
                  batch_size=1)
    end_to_end = len(images) / (time.perf_counter() - t0)
    h, w = rgb[0].shape[:2]
    print(f"{name:10s} {len(images)} images {w}×{h} → test size "
          f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}, {torch.get_num_threads()} "
          f"threads, EBUI {'on' if ebui else 'off'}: model {1 / o:6.2f} images/s "
          f"(standard head {1 / s:6.2f}, ORE / standard time {o / s:.3f}), "
          f"end to end {end_to_end:6.2f} images/s")


def load_config_from(cfg, overrides: list[str]):
    """``cfg`` with ``overrides`` applied, through the real loader."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_to_yaml(cfg))
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained toy run folder (ore train or run-tasks output)")
    ap.add_argument("--only", choices=("toy", "r50_fpn"))
    ap.add_argument("--images", type=int, default=8, help="test images per detector")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = write_toy_world(tmp / "world", seed=0, images_per_task=8, val_images=4,
                                test_images=max(args.images, 2), exemplars_per_class=2)
        images = sorted((world / "JPEGImages").glob("*.jpg"))
        test_ids = (world / "ImageSets" / "Main" / "all_task_test.txt").read_text().split()
        images = [p for p in images if p.stem in set(test_ids)][: args.images]
        if args.only in (None, "toy"):
            if args.run:
                stage = find_run_stage(args.run)  # its last stage, as ore detect --run
                over = [f"DATASETS.ROOT={world}"]
                if stage.energy_fit is not None:
                    over += ["EBUI.ENABLED=true", f"EBUI.FIT_FILE={stage.energy_fit}"]
                cfg = load_config(str(stage.config), over)
                weights = str(stage.weights)
            else:
                cfg = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={world}"])
                weights = _save_untrained(cfg, tmp / "toy.pth")
            bench("toy", cfg, weights, images, tmp)
        if args.only in (None, "r50_fpn"):
            cfg = load_config(R50[0], [*R50[1], f"DATASETS.ROOT={world}"])
            bench("r50_fpn", cfg, _save_untrained(cfg, tmp / "r50.pth"), images, tmp)


if __name__ == "__main__":
    main()
