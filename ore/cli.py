"""The ``ore`` command: a thin dispatcher over subcommands.

Each subcommand lives next to the code it drives, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. User mistakes raise
:class:`ore.errors.OreError`; they are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ore.errors import OreError

# name -> (module, one-line help). A module is imported only when its command is chosen,
# so `ore --help` stays fast and one command's heavy imports never slow another.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("ore.config_cli", "show the merged config of a YAML file"),
    "make-toy-data": ("ore.data.toy", "write the toy open world (OWOD layout + COCO JSON)"),
    "dataset-stats": ("ore.data.stats", "count images and objects of a split after role filtering"),
    "train": ("ore.engine.train_cli", "train a detector from a config"),
    "detect": ("ore.engine.detect", "detect objects (and unknowns) in images"),
    "evaluate": ("ore.engine.evaluate", "run a detector on a split: open-world metrics"),
    "run-tasks": ("ore.engine.tasks", "train, finetune and evaluate every task in turn"),
    "demo": ("ore.engine.demo", "the whole open-world story on the toy world, with a report"),
    "build-exemplars": ("ore.data.exemplars", "write a balanced exemplar list for a finetune"),
    "fit-energy": ("ore.engine.energy_fit", "fit the energy-based unknown identifier (EBUI)"),
    "pretrain": ("ore.contrastive.pretrain", "contrastive pretraining of a backbone trunk"),
    "eval-detections": ("ore.evaluation.cli", "evaluate a detections JSON file (open-world)"),
}


# OpenMP threads that spin while waiting take the CPU from data-loading workers and from
# other processes; on a 2-core machine that made training 3x slower. Must be set before
# torch is imported, which the command modules do lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to add its arguments."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = _ArgumentParser(prog="ore", description="Open-world object detection (ORE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except OreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
