"""``ore fit-energy``: fit the energy-based unknown identifier of a trained ORE model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ore.cli.common import add_batch_size, add_model_arguments, add_overrides, check_batch_size
from ore.config import load_config
from ore.engine.energy_fit import fit_energy
from ore.engine.layout import ENERGY_FIT, ENERGY_PLOT
from ore.modeling.fit_file import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "detector checkpoint (ORE head)")
    p.add_argument("--split", help="held-out list (default: EBUI.FIT_SPLIT)")
    p.add_argument("--mode", choices=MODES, help="what counts as unknown (default: EBUI.MODE)")
    p.add_argument("--output", required=True,
                   help=f"folder for {ENERGY_FIT} and {ENERGY_PLOT}")
    p.add_argument("--max-images", type=int, default=0, help="use the first N images (0 = all)")
    add_batch_size(p)
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    check_batch_size(args.batch_size)
    cfg = load_config(args.config, args.overrides)
    fit = fit_energy(cfg, args.weights, args.output, split_name=args.split, mode=args.mode,
                     batch_size=args.batch_size, max_images=args.max_images)
    for key in ("known", "unknown"):
        w = getattr(fit, key)
        print(f"{key:<8} {fit.counts[key]:>7} samples  shape {w.shape:.4g}  loc {w.loc:.4g}  "
              f"scale {w.scale:.4g}  log-likelihood {fit.log_likelihood[key]:.1f}")
    print(f"wrote {Path(args.output) / ENERGY_FIT} and {ENERGY_PLOT} "
          f"(T={fit.temperature:g}, mode {fit.mode}; use EBUI.ENABLED=true "
          f"EBUI.FIT_FILE=… EBUI.TEMPERATURE={fit.temperature:g})")
    return 0
