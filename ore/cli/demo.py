"""``ore demo``: the whole open-world story on the toy world, with a report."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ore.demo.run import run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/demo", help="folder for everything the demo writes")
    p.add_argument("--quick", action="store_true",
                   help="a small world and a short schedule (a smoke test, not a result)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy world and the training")


def run(args: argparse.Namespace) -> int:
    written = run_demo(args.output, quick=args.quick, seed=args.seed)
    print(f"done in {written['minutes']:.1f} min: {written['html']}  {written['md']}  "
          f"{written['metrics']}")
    print(f"detect with its ORE run: {detect_command(args.output)}")
    print(f"or look at it in a browser: {serve_command(args.output)}")
    return 0


def detect_command(output: str | Path) -> str:
    """The command that runs ``ore detect`` with the demo's ORE run on its toy test images."""
    out = Path(output)
    return shlex.join(["ore", "detect", "--run", str(out / "ore"),
                       str(out / "toy-data" / "JPEGImages"), "--output",
                       str(out / "detections")])


def serve_command(output: str | Path) -> str:
    """The command that serves the demo's ORE run on a local web page."""
    return shlex.join(["ore", "serve", "--run", str(Path(output) / "ore")])
