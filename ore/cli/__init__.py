"""The ``ore`` command line: one module per command, and the only place argparse lives.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and does
nothing else: it reads flags, calls the library, and prints. A user mistake anywhere
below raises :class:`ore.errors.OreError`; :func:`main` prints it as one line
(``error: <message>``) and exits with status 2, never with a traceback. A mistake in the
arguments themselves ends the same way. ``KEY=VALUE`` overrides (and a command's other
positional arguments) may stand anywhere among the options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ore.errors import OreError

# name -> (module under ore.cli, one-line help). A module is imported only when its
# command is chosen, so `ore --help` stays fast and one command's heavy imports never
# slow another.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("config", "show the merged config of a YAML file"),
    "make-toy-data": ("make_toy_data", "write the toy open world (OWOD layout + COCO JSON)"),
    "dataset-stats": ("dataset_stats", "count images and objects of a split after role filtering"),
    "train": ("train", "train a detector from a config"),
    "detect": ("detect", "detect objects (and unknowns) in images and videos"),
    "serve": ("serve", "a local web page and JSON endpoint over a trained detector"),
    "evaluate": ("evaluate", "run a detector on a split: open-world metrics"),
    "run-tasks": ("run_tasks", "train, finetune and evaluate every task in turn"),
    "discover": ("discover", "cluster a run's unknown detections: gallery and labels"),
    "add-task": ("add_task", "learn labelled clusters of unknowns as the run's next task"),
    "demo": ("demo", "the whole open-world story on the toy world, with a report"),
    "build-exemplars": ("build_exemplars", "write a balanced exemplar list for a finetune"),
    "fit-energy": ("fit_energy", "fit the energy-based unknown identifier (EBUI)"),
    "pretrain": ("pretrain", "contrastive pretraining of a backbone trunk"),
    "eval-detections": ("eval_detections", "evaluate a detections JSON file (open-world)"),
}

# OpenMP threads that spin while waiting take the CPU from data-loading workers and from
# other processes; on a 2-core machine that made training 3x slower. Must be set before
# torch is imported, which the command modules do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user mistake
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _command_module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to add its arguments."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = ArgumentParser(prog="ore", description="Open-world object detection (ORE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _command_module(name).add_arguments(p)
    parser.command_parsers = sub.choices  # name -> the command's parser
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, positional arguments allowed among the options
    (``ore train --config C K=V --output D K2=V2``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse takes a positional list in one run; read the command's own arguments
        # again, collecting positionals wherever they stand (unknown options stay errors).
        command = parser.command_parsers[args.command]
        rest = argv[argv.index(args.command) + 1:]
        vars(args).update(vars(command.parse_intermixed_args(rest)))
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a mistake in the arguments (2, one line)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(_command_module(args.command).run(args) or 0)
    except OreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
