"""MODEL.BACKBONE.WEIGHTS files in the published ResNet-50 layouts: torchvision V1/V2,
MSRA caffe2 ``R-50.pkl``, detectron2 names and DINO checkpoints, built here from a
torchvision ResNet-50 with names written out independently of the loader."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ore.engine.checkpoint import load_trunk_weights, read_trunk_weights
from ore.errors import OreError
from ore.modeling.backbone import build_trunk, load_trunk_state
from ore.modeling.weight_files import read_pickle_weights

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MSRA_MEAN_BGR = (103.530, 116.280, 123.675)  # Detectron's PIXEL_MEAN, BGR, 0..255
EPS = 1e-5


def _random_resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict whose batch norms are not the identity."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet50(weights=None).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias")):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return _random_resnet50_state(0)


@pytest.fixture(scope="module")
def other(source) -> dict[str, torch.Tensor]:
    """Other weights with the same keys (V2 weights, a DINO student)."""
    return {k: v * 0.5 + 0.25 if v.is_floating_point() else v.clone() for k, v in source.items()}


# --- the layouts, written from their published descriptions ----------------------------

def _caffe2_name(k: str) -> str | None:
    """torchvision key -> MSRA caffe2 blob (None: caffe2 stores no such blob)."""
    if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
        return None
    fixed = {"conv1.weight": "conv1_w", "bn1.weight": "res_conv1_bn_s",
             "bn1.bias": "res_conv1_bn_b", "fc.weight": "fc1000_w", "fc.bias": "fc1000_b"}
    if k in fixed:
        return fixed[k]
    layer, block, part, *rest = k.split(".")
    res = f"res{int(layer[len('layer'):]) + 1}_{block}"
    suffix = {"weight": "s", "bias": "b"}
    if part == "downsample":
        index, kind = rest
        return f"{res}_branch1_w" if index == "0" else f"{res}_branch1_bn_{suffix[kind]}"
    letter = "abc"[int(part[-1]) - 1]
    if part.startswith("conv"):
        return f"{res}_branch2{letter}_w"
    return f"{res}_branch2{letter}_bn_{suffix[rest[0]]}"


def _detectron2_name(k: str) -> str:
    """torchvision key -> detectron2 ResNet key."""
    if k.startswith(("conv1.", "bn1.", "fc.")):
        return "stem." + k.replace("bn1.", "conv1.norm.")
    layer, block, part, *rest = k.split(".")
    res = f"res{int(layer[len('layer'):]) + 1}.{block}"
    if part == "downsample":
        return f"{res}.shortcut." + ("weight" if rest[0] == "0" else "norm." + rest[1])
    if part.startswith("bn"):
        return f"{res}.conv{part[-1]}.norm.{rest[0]}"
    return f"{res}.{part}.{rest[0]}"


def _numpy(state: dict[str, torch.Tensor], rename) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        name = rename(k)
        if name is not None:
            out[name] = v.numpy().copy()
    return out


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as Detectron's Python 2 did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def _python2_pickle(blobs: dict[str, np.ndarray], path) -> None:
    """A pickle shaped like MSRA's R-50.pkl: protocol 2, byte-string names and data,
    arrays rebuilt by ``numpy.core.multiarray._reconstruct``."""
    import io

    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump({k.encode(): v for k, v in blobs.items()})
    data = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    path.write_bytes(data)


def _frozen_trunk() -> nn.Module:
    return build_trunk("resnet50", "FrozenBN")


def _check_same(trunk: nn.Module, expected: dict[str, torch.Tensor], skip=()) -> int:
    own = trunk.state_dict()
    n = 0
    for k, v in own.items():
        if k in skip or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, expected[k]), k
        n += 1
    return n


def _msra_conv1(w: torch.Tensor) -> torch.Tensor:
    """conv1 of a BGR 0..255 model for RGB input normalised by MEAN/STD."""
    return torch.stack([w[:, 2] * 255 * STD[0], w[:, 1] * 255 * STD[1],
                        w[:, 0] * 255 * STD[2]], dim=1)


# --- torchvision V1 / V2, DINO -----------------------------------------------------------

def test_torchvision_v1_and_v2_files_load_every_tensor(tmp_path, source, other):
    v2 = other  # V2 weights: the same keys, other values
    assert v2.keys() == source.keys()
    for name, state in (("resnet50-v1.pth", source), ("resnet50-v2.pth", v2)):
        path = tmp_path / name
        torch.save(state, path)
        trunk = build_trunk("resnet50", "BN")
        load_trunk_weights(trunk, path)
        assert _check_same(trunk, state) == 265  # 53 convs, 53 norms of 4 tensors
        # torchvision keeps the stride on the 3x3 conv
        assert trunk.layer2[0].conv2.stride == (2, 2) and trunk.layer2[0].conv1.stride == (1, 1)
    assert not torch.equal(source["layer1.0.conv1.weight"], v2["layer1.0.conv1.weight"])


def test_dino_checkpoint_takes_the_teacher(tmp_path, source, other):
    student = other
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in student.items() if "fc." not in k}
        | {"module.head.mlp.0.weight": torch.zeros(4, 2048)},
        "teacher": {f"module.backbone.{k}": v for k, v in source.items() if "fc." not in k}
        | {"module.head.mlp.0.weight": torch.zeros(4, 2048),
           "module.head.last_layer.weight_g": torch.ones(8, 1)},
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet50", out_dim=60000),
    }
    path = tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth"
    torch.save(ckpt, path)
    trunk = _frozen_trunk()
    info = load_trunk_state(trunk, read_trunk_weights(path), str(path))
    assert info.format == "dino" and not info.bgr_255
    assert _check_same(trunk, source) == 265

    released = {k: v for k, v in student.items() if "fc." not in k}  # no classifier
    trunk = _frozen_trunk()
    assert load_trunk_state(trunk, released, "dino_resnet50_pretrain.pth").format == (
        "torchvision")
    assert _check_same(trunk, student) == 265


# --- MSRA caffe2 R-50.pkl ----------------------------------------------------------------

def test_msra_python2_pickle_loads_every_blob(tmp_path, source, caplog):
    blobs = _numpy(source, _caffe2_name)
    assert len(blobs) == 161  # as in MSRA's R-50.pkl
    path = tmp_path / "R-50.pkl"
    _python2_pickle(blobs, path)
    trunk = _frozen_trunk()
    with caplog.at_level(logging.WARNING):
        info = load_trunk_state(trunk, read_trunk_weights(path), str(path))
    assert (info.format, info.bgr_255, info.stride_in_1x1) == ("caffe2", True, True)
    expected = {k: v for k, v in source.items()}
    for k in list(expected):
        if k.endswith("running_mean"):
            expected[k] = torch.zeros_like(expected[k])
        elif k.endswith("running_var"):
            expected[k] = torch.full_like(expected[k], 1 - EPS)
    assert _check_same(trunk, expected, skip={"conv1.weight"}) == 264
    torch.testing.assert_close(trunk.conv1.weight, _msra_conv1(source["conv1.weight"]))
    for layer in (trunk.layer2, trunk.layer3, trunk.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert trunk.layer1[0].conv1.stride == (1, 1)
    [record] = [r for r in caplog.records if "MSRA" in r.getMessage()]
    msg = record.getMessage()
    assert "\n" not in msg and "INPUT.PIXEL_MEAN" in msg and "INPUT.PIXEL_STD" in msg
    assert str(path) in msg


class _Affine(nn.Module):
    """Frozen caffe2 batch norm as written down: s·x + b."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _msra_reference(source: dict[str, torch.Tensor]) -> nn.Module:
    """The MSRA network (stride still on the 3x3 conv): affine norms, BGR 0..255 input."""
    net = torchvision.models.resnet50(weights=None, norm_layer=_Affine)
    net.load_state_dict({k: v for k, v in source.items()
                         if not k.endswith(("running_mean", "running_var", "tracked"))})
    net.fc = nn.Identity()
    net.avgpool = nn.Identity()
    return net.eval()


def test_msra_trunk_on_normalised_rgb_computes_the_msra_network(tmp_path, source):
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": _numpy(source, _caffe2_name), "__author__": "Caffe2",
                     "matching_heuristics": True}, f, protocol=2)
    trunk = _frozen_trunk().eval()
    load_trunk_state(trunk, read_pickle_weights(path), str(path))
    rgb = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    ours_in = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    msra_in = rgb.flip(1) * 255 - torch.tensor(MSRA_MEAN_BGR).view(1, 3, 1, 1)
    ref_net = _msra_reference(source)
    with torch.no_grad():
        ours = trunk(ours_in)
        wrong_stride = ref_net(msra_in).view_as(ours)
        for layer in (ref_net.layer2, ref_net.layer3, ref_net.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
        ref = ref_net(msra_in).view_as(ours)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() < 1e-4 * scale
    assert (wrong_stride - ref).abs().max() > 1e-2 * scale  # the stride placement matters


def test_msra_weights_need_batch_norm_and_the_msra_means(tmp_path, source):
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump(_numpy(source, _caffe2_name), f, protocol=2)
    obj = read_pickle_weights(path)
    with pytest.raises(OreError, match=r"MODEL\.BACKBONE\.NORM to FrozenBN") as err:
        load_trunk_state(build_trunk("resnet50", "GN"), obj, str(path))
    assert str(path) in str(err.value)
    with pytest.raises(OreError, match=r"INPUT\.PIXEL_MEAN \[0\.5, 0\.5, 0\.5\] differs"):
        load_trunk_state(_frozen_trunk(), obj, str(path),
                         pixel_mean=(0.5, 0.5, 0.5))


# --- detectron2 names --------------------------------------------------------------------

def test_detectron2_names_from_torchvision_and_from_msra(tmp_path, source):
    d2 = _numpy(source, _detectron2_name)
    assert "res2.0.conv1.norm.running_var" in d2 and "stem.conv1.norm.weight" in d2
    # detectron2's torchvision converter: author torchvision, RGB, stride on the 3x3 conv
    path = tmp_path / "r50-torchvision.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    trunk = build_trunk("resnet50", "BN")
    info = load_trunk_state(trunk, read_trunk_weights(path), str(path))
    assert (info.format, info.bgr_255, info.stride_in_1x1) == ("detectron2", False, False)
    assert _check_same(trunk, source) == 265
    assert trunk.layer3[0].conv2.stride == (2, 2)

    # a detectron2 model trained from MSRA weights: BGR, stride on the 1x1 conv
    ckpt = {"model": {f"backbone.bottom_up.{k}": torch.from_numpy(v) for k, v in d2.items()},
            "iteration": 90000}
    trunk = _frozen_trunk()
    info = load_trunk_state(trunk, ckpt, "model_final.pth")
    assert (info.format, info.bgr_255, info.stride_in_1x1) == ("detectron2", True, True)
    assert _check_same(trunk, source, skip={"conv1.weight"}) == 264  # running stats kept
    torch.testing.assert_close(trunk.conv1.weight, _msra_conv1(source["conv1.weight"]))
    assert trunk.layer3[0].conv1.stride == (2, 2)


# --- what must not load -------------------------------------------------------------------

class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("open('x', 'w')",)


@pytest.mark.parametrize("payload", ["system", "eval", "object-array"])
def test_crafted_pickle_runs_nothing(tmp_path, source, payload):
    marker = tmp_path / "ran"
    blobs: dict = _numpy({"conv1.weight": source["conv1.weight"]}, _caffe2_name)
    if payload == "system":
        blobs["res2_0_branch2a_w"] = _RunsACommand(marker)
    elif payload == "eval":
        blobs["res2_0_branch2a_w"] = _CallsEval()
    else:
        blobs["res2_0_branch2a_w"] = np.array([_RunsACommand(marker)], dtype=object)
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump(blobs, f, protocol=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(OreError, match=re.escape(str(path))) as err:
            read_trunk_weights(path)
    finally:
        os.chdir(cwd)
    assert "nothing in them is run" in str(err.value)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_every_mismatched_key_is_named(tmp_path, source):
    state = dict(source)
    state.pop("layer3.2.bn2.running_var")
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["module_extra"] = torch.zeros(1)
    with pytest.raises(OreError) as err:
        load_trunk_state(build_trunk("resnet50", "BN"), state, "broken.pth")
    msg = str(err.value)
    assert "\n" not in msg and "broken.pth" in msg and "torchvision layout" in msg
    assert "1 missing keys, 2 unexpected keys" in msg
    assert "missing layer3.2.bn2.running_var" in msg
    assert "unexpected layer5.0.conv1.weight" in msg and "unexpected module_extra" in msg

    # caffe2 names: the file's own blob name is given
    blobs = _numpy(source, _caffe2_name)
    blobs.pop("res4_5_branch2c_w")
    blobs["res4_5_branch2d_w"] = np.zeros(1, np.float32)
    blobs["res2_0_branch2a_bn_s"] = np.ones(5, np.float32)
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump(blobs, f, protocol=4)
    with pytest.raises(OreError) as err:
        load_trunk_state(_frozen_trunk(), read_pickle_weights(path), str(path))
    msg = str(err.value)
    assert "caffe2 layout" in msg and "1 missing keys, 1 unexpected keys" in msg
    assert "missing layer3.5.conv3.weight" in msg and "unexpected res4_5_branch2d_w" in msg

    blobs.pop("res4_5_branch2d_w")
    blobs["res4_5_branch2c_w"] = source["layer3.5.conv3.weight"].numpy()
    with path.open("wb") as f:
        pickle.dump(blobs, f, protocol=5)
    expected = (r"1 tensors have the wrong shape: layer1\.0\.bn1\.weight "
                r"\(file key res2_0_branch2a_bn_s\) has \(5,\), the trunk \(64,\)")
    with pytest.raises(OreError, match=expected):
        load_trunk_state(_frozen_trunk(), read_pickle_weights(path), str(path))
