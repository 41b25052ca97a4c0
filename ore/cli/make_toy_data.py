"""``ore make-toy-data --out DIR``: write the toy open world."""

from __future__ import annotations

import argparse

from ore.data.toy import write_toy_world


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-task", type=int, default=300)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--exemplars-per-class", type=int, default=20)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a toy world written there before (never any other folder)")


def run(args: argparse.Namespace) -> int:
    out = write_toy_world(
        args.out, seed=args.seed, images_per_task=args.images_per_task,
        val_images=args.val_images, test_images=args.test_images,
        exemplars_per_class=args.exemplars_per_class, overwrite=args.overwrite,
    )
    n = len(list((out / "JPEGImages").iterdir()))
    print(f"wrote the toy world to {out} ({n} images)")
    return 0
