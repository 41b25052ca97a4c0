#!/usr/bin/env bash
# One short check of the GPU path: ResNet-50-FPN with the ORE head trained on the toy world
# upscaled to the M-OWODB input size (min side 800, max 1333), bf16 autocast, batch 8, through
# torchrun (NCCL, one process), then evaluated. Prints images/s, peak GPU memory, the loss
# curve's start and end and the evaluation, and writes them to OUT/gpu_check.json.
#
#   tools/gpu_check.sh [OUT]            on a CUDA machine (about 5 minutes on one H200)
#   tools/gpu_check.sh --cpu-smoke OUT  the same steps on the CPU at a tiny size (gloo): the
#                                       tests run this so the script cannot rot
#
# The backbone starts from random weights (GroupNorm), so the evaluation shows that the
# path works end to end, not the accuracy of a pretrained detector.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    smoke=1
    shift
fi
out=${1:-runs/gpu-check}
py=${PYTHON:-.venv/bin/python}
if [ ! -x "$py" ]; then
    echo "error: $py not found; run 'make .venv/.installed' first or set PYTHON" >&2
    exit 2
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "error: $out is not empty; pass another folder" >&2
    exit 2
fi

if [ $smoke = 1 ]; then
    iters=4; log=2; batch=2; images=8; device=cpu; workers=0
    model=(MODEL.BACKBONE.NAME=tiny_fpn MODEL.BACKBONE.NORM=GN INPUT.MIN_SIZE_TRAIN=[96]
           INPUT.MAX_SIZE_TRAIN=160 INPUT.MIN_SIZE_TEST=96 INPUT.MAX_SIZE_TEST=160)
else
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device visible to torch; --cpu-smoke runs the CPU path" >&2
        exit 2
    fi
    iters=300; log=20; batch=8; images=96; device=cuda; workers=8
    model=(MODEL.BACKBONE.NAME=resnet50_fpn MODEL.BACKBONE.NORM=GN MODEL.BACKBONE.WEIGHTS=
           MODEL.BACKBONE.TRAINABLE_LAYERS=5 "MODEL.BACKBONE.RETURNED_STAGES=[1,2,3,4]"
           MODEL.BACKBONE.FPN_CHANNELS=256 MODEL.ROI_BOX_HEAD.FC_DIM=1024
           MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO=2
           "MODEL.ANCHOR.SIZES=[[32],[64],[128],[256],[512]]"
           INPUT.MIN_SIZE_TRAIN=[800] INPUT.MAX_SIZE_TRAIN=1333
           INPUT.MIN_SIZE_TEST=800 INPUT.MAX_SIZE_TEST=1333)
fi

mkdir -p "$out"
"$py" -m ore make-toy-data --out "$out/toy" --images-per-task $images --val-images 16 \
    --test-images $((images / 2)) --exemplars-per-class 2 >/dev/null
common=(DATASETS.ROOT="$out/toy" DEVICE=$device DATALOADER.NUM_WORKERS=$workers
        SOLVER.AMP=bf16 "${model[@]}")
start=$(date +%s)
"$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m ore train \
    --config toy/t1_train.yaml --output "$out/train" "${common[@]}" \
    SOLVER.IMS_PER_BATCH=$batch SOLVER.MAX_ITER=$iters SOLVER.STEPS=[$((iters * 3 / 4))] \
    SOLVER.WARMUP_ITERS=$((iters / 10)) SOLVER.LOG_PERIOD=$log \
    SOLVER.CHECKPOINT_PERIOD=$iters CLUSTERING.START_ITER=$((iters / 3)) \
    CLUSTERING.UPDATE_MU_ITER=$((iters / 10 > 0 ? iters / 10 : 1))
trained=$(date +%s)
"$py" -m ore evaluate --config "$out/train/config.yaml" --weights "$out/train/model_final.pth" \
    --output "$out/eval.json" --no-coco DEVICE=$device DATALOADER.NUM_WORKERS=$workers \
    > "$out/eval.log"
done_at=$(date +%s)

"$py" - "$out" $((trained - start)) $((done_at - trained)) <<'EOF'
import json
import sys
from pathlib import Path

import torch

out, train_s, eval_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
        if line.strip()]
rows = [r for r in rows if "loss" in r]
speed = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]  # skip warm-up
ev = json.loads((out / "eval.json").read_text())
report = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "iterations": rows[-1]["iter"],
    "images_per_s_median": sorted(speed)[len(speed) // 2],
    "gpu_mem_peak_gib": max((r.get("gpu_mem_peak_gib", 0.0) for r in rows), default=0.0),
    "loss_start": rows[0]["loss"],
    "loss_end": rows[-1]["loss"],
    "train_wall_s": train_s,
    "eval_wall_s": eval_s,
    "known_mAP50": ev["known_mAP_both"],
    "unknown_recall": ev["unknown_recall"],
    "a_ose": ev["a_ose"],
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
for k, v in report.items():
    print(f"{k:22s} {v:.3f}" if isinstance(v, float) else f"{k:22s} {v}")
EOF
