"""Training throughput with 1 and 2 processes (DDP over gloo on the CPU, NCCL on GPUs).

Every configuration runs the real trainer (``ore.engine.trainer.Trainer``) in processes
started with ``torch.multiprocessing.spawn``, each joining the group through the same
environment variables torchrun sets. Throughput is global images per second over the
iterations after a warm-up, read from rank 0's ``metrics.jsonl`` (one row per
iteration); peak memory is each process's maximum resident set size.

    python tools/bench_scaling.py                      # toy config, CPU: 1x1, 1x2, 2x1
    python tools/bench_scaling.py --iters 40 --json runs/bench_scaling.json
    python tools/bench_scaling.py --device cuda --set SOLVER.AMP=bf16 ...   # on GPUs

Runs: ``P x T`` means P processes with T threads each. On a machine with C cores,
``1 x C`` (one process using every core through intra-op threads) is the fair
baseline for ``C x 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from ore.config import load_config  # noqa: E402
from ore.data.toy import write_toy_world  # noqa: E402
from ore.engine.metrics_log import FILE as METRICS_FILE  # noqa: E402
from ore.engine.metrics_log import read_metrics  # noqa: E402
from ore.engine.trainer import Trainer  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, threads: int, port: int, overrides: list[str],
            config: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    Trainer(load_config(config, overrides), Path(out) / "run").run()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (Path(out) / f"rss{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_mib}))


def measure(world: int, threads: int, args, root: Path) -> dict:
    iters = args.warmup + args.iters
    overrides = [
        f"DATASETS.ROOT={root}", f"SOLVER.IMS_PER_BATCH={args.batch}",
        f"SOLVER.MAX_ITER={iters}", "SOLVER.LOG_PERIOD=1", f"SOLVER.CHECKPOINT_PERIOD={iters}",
        f"DATALOADER.NUM_WORKERS={args.workers}", f"DEVICE={args.device}", *args.set,
    ]
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as out:
        mp.spawn(_worker, args=(world, threads, _free_port(), overrides, args.config, out),
                 nprocs=world, join=True)
        rows = read_metrics(Path(out) / "run" / METRICS_FILE, ("iter", "images_per_s"))
        rss = [json.loads((Path(out) / f"rss{r}.json").read_text())["peak_rss_mib"]
               for r in range(world)]
    timed = [r for r in rows if r["iter"] > args.warmup]
    seconds = sum(args.batch / r["images_per_s"] for r in timed)
    return {"processes": world, "threads_per_process": threads,
            "images_per_s": args.batch * len(timed) / seconds,
            "peak_rss_mib_per_process": [round(m, 1) for m in rss]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="toy/t1_train.yaml")
    p.add_argument("--root", help="toy world (written to a temporary folder when omitted)")
    p.add_argument("--batch", type=int, default=4, help="global batch (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DATALOADER.NUM_WORKERS per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further config overrides")
    p.add_argument("--runs", default="1x1,1x2,2x1", help="PxT runs (processes x threads)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-toy-") as tmp:
        root = Path(args.root) if args.root else None
        if root is None:
            root = write_toy_world(Path(tmp) / "toy", seed=0, images_per_task=64,
                                   val_images=4, test_images=4, exemplars_per_class=2)
        results = []
        for run in args.runs.split(","):
            world, threads = (int(x) for x in run.split("x"))
            res = measure(world, threads, args, root)
            results.append(res)
            print(f"{world} process(es) x {threads} thread(s): "
                  f"{res['images_per_s']:.2f} images/s, peak RSS per process "
                  f"{res['peak_rss_mib_per_process']} MiB", flush=True)
    by_run = {(r["processes"], r["threads_per_process"]): r["images_per_s"] for r in results}
    summary = {"cores": os.cpu_count(), "config": args.config, "global_batch": args.batch,
               "device": args.device, "runs": results}
    if (1, 1) in by_run and (2, 1) in by_run:
        summary["ratio_2x1_over_1x1"] = by_run[(2, 1)] / by_run[(1, 1)]
        print(f"2 processes / 1 process (1 thread each): {summary['ratio_2x1_over_1x1']:.2f}x")
    if (1, 2) in by_run and (2, 1) in by_run:
        summary["ratio_2x1_over_1x2"] = by_run[(2, 1)] / by_run[(1, 2)]
        print(f"2 processes x 1 thread / 1 process x 2 threads: "
              f"{summary['ratio_2x1_over_1x2']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
