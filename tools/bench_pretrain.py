"""kNN top-1 on Fashion-MNIST for raw pixels, a random-init trunk, and each pretraining
method after the same CPU budget.

Protocol: the 60k training images are the bank, the 10k test images are scored; cosine
kNN (unit-normalised features, k = 200, votes weighted by exp(sim/0.1)) and plain L2 kNN
(k = 5, majority vote). Network features are the globally pooled last trunk map at the
training resolution. Needs the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``).

    python tools/bench_pretrain.py --minutes 15            # 15 minutes per method
    python tools/bench_pretrain.py --minutes 3 --methods simclr,moco
    python tools/bench_pretrain.py --procs 2   # 2 processes (gloo) share the cores
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ore.cli.pretrain import add_arguments, options
from ore.contrastive.knn import KNNMonitor
from ore.contrastive.methods import METHODS, PooledTrunk
from ore.data.fashion_mnist import fashion_mnist_available, load_fashion_mnist
from ore.engine.pretrain import DEFAULT_SIZE, Preprocess, PretrainOptions, pretrain
from ore.engine.runtime import environment
from ore.fileio import atomic_write, atomic_write_json
from ore.modeling.backbone import build_trunk


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per method")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--arch", default="tiny")
    p.add_argument("--batch-size", type=int, default=64,
                   help="64 scored best on a 15-minute CPU budget; 256 is the GPU recipe")
    p.add_argument("--image-size", type=int, default=DEFAULT_SIZE)
    p.add_argument("--extra", default="", help="more `ore pretrain` flags for every method, "
                   "e.g. \"--jitter 0.4 --solarize-prob 0\" or --extra --decoupled; the "
                   "augmentation and optimiser are `ore pretrain`'s defaults otherwise")
    p.add_argument("--procs", type=int, default=1,
                   help="train each method with torchrun in this many processes, splitting "
                        "the threads among them (the batch is the global batch)")
    p.add_argument("--out", default="runs/bench_pretrain", help="folder for weights + results")
    args = p.parse_args(_join_extra(sys.argv[1:]))
    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    prep = Preprocess(train.images, args.image_size)
    results: dict[str, dict] = {}

    def report(name, rec):
        results[name] = rec
        extra = f"   ({rec['steps']} steps, {rec['train_seconds']:.0f}s)" if "steps" in rec else ""
        print(f"{name:>12}  cosine k=200: {100 * rec['knn_cosine_top1']:.2f}%   "
              f"L2 k=5: {100 * rec['knn_l2_top1']:.2f}%{extra}", flush=True)
        atomic_write_json(out / "results.json", {
            "config": {**vars(args), "threads": torch.get_num_threads()}, "results": results,
        })

    pixels = KNNMonitor(train.images, train.labels, test.images, test.labels,
                        transform=lambda x: x.float().flatten(1) / 255)
    report("raw pixels", pixels(lambda x: x))
    torch.manual_seed(0)
    net = PooledTrunk(build_trunk(args.arch)).eval()
    monitor = KNNMonitor(train.images, train.labels, test.images, test.labels,
                         transform=prep.eval_view)
    report("random init", monitor(net))

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for method in args.methods.split(","):
        t0 = time.time()
        argv = [
            "--method", method, "--dataset", "fashion-mnist", "--arch", args.arch,
            "--epochs", "1000", "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--minutes", str(args.minutes),
            "--knn-every", "0", "--no-progress", "--output", str(out / method / "trunk.pth"),
            *shlex.split(args.extra),
        ]
        opts = options(parser.parse_args(argv))
        if args.procs > 1:
            rec = _pretrain_processes(opts, args.procs)
        else:
            rec = pretrain(opts)
        rec["wall_seconds"] = round(time.time() - t0, 1)
        rec["args"] = asdict(opts)  # the recipe as run (defaults resolved unless --procs > 1)
        report(method, rec)
    print(f"budget {args.minutes} min/method, arch {args.arch}, batch {args.batch_size}, "
          f"{args.image_size}px, {torch.get_num_threads()} threads in {args.procs} "
          f"process(es); results in {out}")
    plot(results, out / "results.png",
         f"Fashion-MNIST kNN top-1, {args.arch} trunk, {args.minutes:g} min per method")
    return 0


def _join_extra(argv: list[str]) -> list[str]:
    """``--extra VALUE`` → ``--extra=VALUE``: argparse reads a VALUE that starts with a dash,
    such as ``--extra --decoupled``, as an option and stops with "expected one argument"."""
    out, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        out.append(f"--extra={rest.pop(0)}" if a == "--extra" and rest else a)
    return out


def _pretrain_processes(opts: PretrainOptions, procs: int) -> dict:
    """``pretrain(opts)`` in ``procs`` processes on one machine (what torchrun does, through
    its Python launcher); rank 0's last metrics record, where it ran the kNN."""
    threads = max(1, torch.get_num_threads() // procs)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=procs,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    with environment(OMP_NUM_THREADS=str(threads)):
        rec = elastic_launch(config, pretrain)(opts)[0]
    rec["processes"], rec["threads_per_process"] = procs, threads
    return rec


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Grouped bars (cosine k=200, L2 k=5) per model, with the target lines."""
    names = list(results)
    x = torch.arange(len(names)).float()
    fig = Figure(figsize=(1.2 * len(names) + 2, 4))
    ax = fig.subplots()
    for off, key, label in ((-0.2, "knn_cosine_top1", "cosine k=200"),
                            (0.2, "knn_l2_top1", "L2 k=5")):
        vals = [100 * results[n][key] for n in names]
        bars = ax.bar((x + off).tolist(), vals, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(85.5, color="gray", ls="--", lw=1, label="target 85.5 (SimCLR, MoCo)")
    ax.axhline(90.0, color="gray", ls=":", lw=1, label="target 90 (SupCon)")
    ax.set_xticks(x.tolist(), names)
    ax.set_ylim(50, 106)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=4, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


if __name__ == "__main__":
    sys.exit(main())
