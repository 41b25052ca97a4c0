"""``ore pretrain``: the written trunk loads into the detector's backbone; user mistakes
are one-line errors; the methods run a step each."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ore.cli import main as cli_main
from ore.cli.pretrain import add_arguments, options
from ore.contrastive.methods import (
    DEFAULT_HEAD,
    DEFAULT_TEMPERATURE,
    HEADS,
    METHODS,
    build_method,
)
from ore.data.fashion_mnist import fashion_mnist_available, load_fashion_mnist, read_idx
from ore.engine.checkpoint import load_trunk_weights, read_trunk_weights
from ore.engine.pretrain import _channels_last, check_options, pretrain, save_trunk
from ore.errors import OreError
from ore.modeling.backbone import build_fpn_backbone, build_trunk, trunk_out_channels
from tests.scripts import load_script


def _first_weight(state, stage):
    return next(k for k in state if k.startswith(stage + ".") and k.endswith("weight"))


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return options(p.parse_args(list(argv)))


@pytest.fixture
def image_dir(tmp_path):
    import cv2

    d = tmp_path / "imgs" / "sub"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        img = rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
        cv2.imwrite(str(d / f"{i}.png"), img)
    return tmp_path / "imgs"


@pytest.mark.parametrize("method,optimizer,extra", [
    ("simclr", "sgd", ["--debiased", "0.1"]),
    ("moco", "adamw", ["--small-crops", "2", "--small-size", "16", "--decoupled",
                       "--symmetric"]),
])
def test_pretrain_writes_trunk_the_detector_loads(image_dir, tmp_path, method, optimizer, extra):
    out = tmp_path / "w" / "trunk.pth"
    rc = cli_main([
        "pretrain", "--method", method, "--images", str(image_dir), "--arch", "tiny",
        "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--queue-size", "16",
        "--optimizer", optimizer, "--output", str(out), "--no-progress", *extra,
    ])
    assert rc == 0 and out.is_file()
    state = torch.load(out, weights_only=True)
    trunk = build_trunk("tiny")
    assert set(state) == set(trunk.state_dict())  # exactly the trunk, no head
    load_trunk_weights(trunk, out)  # strict: raises on any missing/unexpected key
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, state[k])
    # The weights changed from a fresh init, i.e. training happened and was saved.
    fresh = build_trunk("tiny").state_dict()
    k4, k1 = _first_weight(state, "layer4"), _first_weight(state, "layer1")
    assert not torch.equal(fresh[k4], state[k4])
    fpn = build_fpn_backbone(arch="tiny", weights=read_trunk_weights(out))
    assert torch.equal(fpn.body.state_dict()[k1], state[k1])
    lines = (out.parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert not list(out.parent.glob(".*tmp*"))  # no temp file left behind
    import cv2

    curves = cv2.imread(str(out.parent / "curves.png"))
    assert curves is not None and curves.shape[1] == 495  # one panel (no labels): loss only


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_defaults_are_resolved_in_the_arguments(image_dir, tmp_path, method):
    """Benchmarks record ``vars(args)`` as the recipe, so no default may stay ``None``."""
    args = _args("--method", method, "--images", str(image_dir), "--arch", "tiny",
                 "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                 "--output", str(tmp_path / "t.pth"), "--no-progress")
    assert args.temperature is None and args.crop_scale is None and args.queue_size is None
    assert args.head is None and args.jitter is None and args.momentum is None
    pretrain(args)
    assert args.temperature == DEFAULT_TEMPERATURE[method]
    assert args.head == DEFAULT_HEAD[method] == ("linear" if method == "moco" else "mlp")
    assert args.crop_scale == (0.2, 1.0)  # image folders' default
    assert args.jitter == 0.8  # SimCLR's strength for colour images
    # MoCo's queue holds the keys of the last 16 steps (batch keys per step, one-way loss).
    assert args.queue_size == (16 * 4 if method == "moco" else 4096)
    assert args.lr == 0.06  # not scaled down below batch 256
    assert args.momentum == (0.995 if method == "moco" else 0.99)
    assert args.symmetric is False  # MoCo's one-way loss unless --symmetric


def test_fashion_mnist_defaults_differ_from_image_folders(tmp_path):
    args = _args("--method", "simclr", "--dataset", "fashion-mnist",
                 "--output", str(tmp_path / "t.pth"))
    check_options(args)  # resolves defaults without loading data
    assert args.jitter == 0.95 and args.crop_scale == (0.4, 1.0)


def test_resnet18_trunk_roundtrip(tmp_path):
    trunk = build_trunk("resnet18")
    out = tmp_path / "r18.pth"
    save_trunk(trunk, out)
    load_trunk_weights(build_trunk("resnet18"), out)
    build_fpn_backbone(arch="resnet18", weights=read_trunk_weights(out))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_finite_training_step(method, head):
    torch.manual_seed(0)
    trunk = build_trunk("tiny")
    m = build_method(
        method, trunk, trunk_out_channels("tiny"), temperature=0.2, hidden_dim=32, out_dim=16,
        queue_size=32, momentum=0.9, num_samples=8, num_clusters=(2, 3), recluster_steps=1,
        head=head,
    )
    if head == "none" and method != "nnclr":  # NNCLR keeps its predictor
        # The loss sees the pooled trunk features themselves.
        assert not any(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x1, x2 = torch.randn(2, 8, 3, 32, 32).unbind(0)
    labels, index = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3]), torch.arange(8)
    key = _first_weight(trunk.state_dict(), "layer1")
    before = trunk.state_dict()[key].clone()
    for _ in range(2):  # PCL clusters before its second step
        loss = m(x1, x2, labels, index)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, trunk.state_dict()[key])
    if method == "pcl":
        assert len(m.loss.prototypes) == 2


def test_moco_predictor_trains_and_stays_out_of_the_key_encoder():
    torch.manual_seed(0)
    trunk = build_trunk("tiny")
    m = build_method("moco", trunk, trunk_out_channels("tiny"), temperature=0.2,
                     hidden_dim=32, out_dim=16, queue_size=32, momentum=0.9, predictor=True)
    assert m.moco.predictor is not None
    assert not m.moco.symmetric  # one-way by default
    loss = m(*torch.randn(2, 8, 3, 32, 32).unbind(0))
    loss.backward()
    assert all(p.grad is not None for p in m.moco.predictor.parameters())
    # The key encoder copies the query encoder (trunk + head) without the predictor.
    key_shapes = [p.shape for p in m.moco.encoder_k.parameters()]
    assert key_shapes == [p.shape for p in m.moco.encoder_q.parameters()]


def test_simclr_and_supcon_multi_crop_treat_every_crop_of_an_image_as_a_positive():
    torch.manual_seed(0)
    kw = dict(temperature=0.2, hidden_dim=32, out_dim=16, queue_size=32, momentum=0.9,
              num_samples=8, num_clusters=(2,), recluster_steps=1)
    n, v = 4, 3
    x1, x2 = torch.randn(2, n, 3, 32, 32).unbind(0)
    small = torch.randn(v * n, 3, 16, 16)
    labels = torch.tensor([0, 1, 0, 2])
    for name, lab in (("simclr", torch.arange(n)), ("supcon", labels)):
        m = build_method(name, build_trunk("tiny"), trunk_out_channels("tiny"), **kw)
        loss = m(x1, x2, labels, torch.arange(n), small)
        with torch.no_grad():  # train-mode BN: the same two passes as the method makes
            z = F.normalize(torch.cat([m.projector(m.encoder(torch.cat([x1, x2]))),
                                       m.projector(m.encoder(small))]), dim=1)
        owner = lab.repeat(2 + v)  # crop c belongs to image c % n
        total, count = 0.0, 0
        for a in range(len(z)):
            others = [b for b in range(len(z)) if b != a]
            log_denom = math.log(sum(math.exp(float(z[a] @ z[b]) / 0.2) for b in others))
            pos = [b for b in others if owner[b] == owner[a]]
            total += -sum(float(z[a] @ z[b]) / 0.2 - log_denom for b in pos) / len(pos)
            count += 1
        assert math.isclose(float(loss.detach()), total / count, rel_tol=1e-4), name
    nnclr = build_method("nnclr", build_trunk("tiny"), trunk_out_channels("tiny"), **kw)
    with pytest.raises(ValueError, match="multi-crop"):
        nnclr(x1, x2, labels, torch.arange(n), small)
    dcl = build_method("simclr", build_trunk("tiny"), trunk_out_channels("tiny"),
                       decoupled=True, **kw)
    with pytest.raises(ValueError, match="no decoupled or debiased form"):
        dcl(x1, x2, labels, torch.arange(n), small)


def _torchrun_pretrain(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ore", "pretrain", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_torchrun_two_processes_pretrain_on_one_clock(image_dir, tmp_path):
    """Two processes split each batch, stop at the same step on a time budget (a process
    that stopped alone would leave the other waiting in DDP's all-reduce), and rank 0
    alone writes."""
    out = tmp_path / "w" / "trunk.pth"
    proc = _torchrun_pretrain([
        "--method", "moco", "--images", str(image_dir), "--arch", "tiny", "--epochs", "1000",
        "--minutes", "0.05", "--batch-size", "4", "--image-size", "32", "--queue-size", "16",
        "--output", str(out), "--no-progress",
    ], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out.parent / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one writer
    assert 1 < len(rows) < 1000
    steps = [r["steps"] for r in rows]
    assert all(a < b for a, b in zip([0, *steps], steps))  # no empty epoch at the stop
    load_trunk_weights(build_trunk("tiny"), out)
    proc = _torchrun_pretrain(["--method", "nnclr", "--images", str(image_dir),
                               "--output", str(tmp_path / "n.pth")], tmp_path)
    assert proc.returncode != 0
    assert "--method nnclr runs in one process only" in proc.stderr


def test_empty_image_folder_is_an_ore_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = cli_main([
        "pretrain", "--method", "simclr", "--images", str(tmp_path / "empty"),
        "--output", str(tmp_path / "o.pth"),
    ])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no images" in err and err.count("\n") == 1


def test_channels_last_keeps_narrow_convolutions_nchw_without_changing_outputs():
    torch.manual_seed(0)
    trunk = build_trunk("tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = trunk(x)
    seen = {}
    for name in ("stem", "layer1"):
        getattr(trunk, name).register_forward_hook(lambda m, i, o, k=name: seen.update({k: o}))
    _channels_last(trunk)
    cl = torch.channels_last
    assert trunk.stem[0].weight.is_contiguous()  # 12 output channels: NCHW
    assert trunk.layer1[0].weight.is_contiguous(memory_format=cl)
    assert not trunk.layer1[0].weight.is_contiguous()
    out = trunk(x)
    assert seen["stem"].is_contiguous()  # so the stem's batch norm ran NCHW
    assert seen["layer1"].is_contiguous(memory_format=cl) and not seen["layer1"].is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5)


def test_missing_dataset_and_bad_arguments_are_ore_errors(tmp_path, image_dir):
    with pytest.raises(OreError, match="apt-get install dataset-fashion-mnist"):
        pretrain(_args("--method", "simclr", "--dataset", "fashion-mnist",
                       "--data-dir", str(tmp_path), "--output", str(tmp_path / "o.pth")))
    with pytest.raises(OreError, match="needs labels"):
        pretrain(_args("--method", "supcon", "--images", str(image_dir),
                       "--output", str(tmp_path / "o.pth")))
    with pytest.raises(OreError, match="batch-size"):
        pretrain(_args("--method", "simclr", "--images", str(image_dir), "--batch-size", "64",
                       "--output", str(tmp_path / "o.pth")))
    with pytest.raises(OreError, match="--minutes"):
        pretrain(_args("--method", "simclr", "--images", str(image_dir), "--minutes", "0",
                       "--output", str(tmp_path / "o.pth")))
    with pytest.raises(OreError, match="not a directory"):
        pretrain(_args("--method", "simclr", "--images", str(tmp_path / "nope"),
                       "--output", str(tmp_path / "o.pth")))
    for flag, value, message in (("--crop-scale", "0.5", "LO,HI"),
                                 ("--crop-scale", "0.9,0.2", "0 < LO ≤ HI ≤ 1"),
                                 ("--jitter", "1.5", "--jitter"),
                                 ("--jitter-prob", "-0.1", "--jitter-prob must be in"),
                                 ("--solarize-prob", "2", "--solarize-prob"),
                                 ("--lr", "0", "--lr must be > 0"),
                                 ("--queue-size", "0", "--queue-size must be ≥ 1"),
                                 ("--small-crop-scale", "0.1", "--small-crop-scale: expected"),
                                 ("--small-crops", "-1", "--small-crops must be ≥ 0"),
                                 ("--small-size", "4", "--small-size must be ≥ 8")):
        with pytest.raises(OreError, match=message):
            pretrain(_args("--method", "simclr", "--images", str(image_dir), flag, value,
                           "--output", str(tmp_path / "o.pth")))
    for method, flags, message in (
        ("pcl", ["--decoupled"], "--decoupled: pcl has no decoupled loss"),
        ("simclr", ["--decoupled", "--small-crops", "2"], "--decoupled with --small-crops"),
        ("nnclr", ["--debiased", "0.1"], "--debiased: nnclr has no debiased loss"),
        ("simclr", ["--debiased", "1"], "--debiased must be in"),
        ("moco", ["--debiased", "0.1", "--decoupled"], "--debiased with --decoupled"),
        ("simclr", ["--debiased", "0.1", "--small-crops", "2"], "--debiased with --small-crops"),
        ("nnclr", ["--small-crops", "2"], "nnclr has no multi-crop form"),
        ("simclr", ["--predictor"], "--predictor: only moco takes it"),
        ("pcl", ["--batch-negatives"], "--batch-negatives: only moco takes it"),
        ("simclr", ["--symmetric"], "--symmetric: only moco takes it"),
        ("pcl", ["--momentum", "1.5"], "--momentum must be in"),
    ):
        with pytest.raises(OreError, match=message):
            pretrain(_args("--method", method, "--images", str(image_dir), *flags,
                           "--output", str(tmp_path / "o.pth")))


def test_read_idx_roundtrip_and_corrupt_file(tmp_path):
    import gzip
    import struct

    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    assert np.array_equal(read_idx(p), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(OreError):
        read_idx(bad)


@pytest.mark.skipif(not fashion_mnist_available() and not os.environ.get("CI"),
                    reason="Debian package dataset-fashion-mnist is not installed "
                           "(.ci/run installs it; under CI=true this test runs and fails)")
def test_fashion_mnist_loads_and_pretrain_reports_knn(tmp_path):
    test = load_fashion_mnist("test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    out = tmp_path / "fm" / "trunk.pth"
    rec = pretrain(_args(
        "--method", "supcon", "--dataset", "fashion-mnist", "--arch", "tiny", "--epochs", "1",
        "--batch-size", "32", "--minutes", "0.05", "--knn-limit", "500", "--no-progress",
        "--output", str(out),
    ))
    assert 0.0 <= rec["knn_cosine_top1"] <= 1.0 and 0.0 <= rec["knn_l2_top1"] <= 1.0
    import cv2

    curves = cv2.imread(str(out.parent / "curves.png"))
    assert curves is not None and curves.shape[1] == 990  # loss and kNN panels
    load_trunk_weights(build_trunk("tiny"), out)


def test_bench_pretrain_takes_a_lone_flag_as_extra():
    bench = load_script("tools/bench_pretrain.py")
    assert bench._join_extra(["--extra", "--decoupled", "--minutes", "3"]) == [
        "--extra=--decoupled", "--minutes", "3"]
    assert bench._join_extra(["--extra", "--seed 1", "--extra"]) == ["--extra=--seed 1", "--extra"]
    assert bench._join_extra(["--extra=--x"]) == ["--extra=--x"]
