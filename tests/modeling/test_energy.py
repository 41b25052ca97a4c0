"""EBUI: energy, 3-parameter Weibull fits, the fit file, relabelling, fit-energy."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ore.cli import main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.errors import OreError
from ore.modeling.detector import build_detector, checkpoint_meta
from ore.modeling.energy import EnergyRelabeller, energy
from ore.modeling.fit_file import EnergyFit, fit_energies
from ore.modeling.weibull import Weibull3, fit_weibull3

TOY = load_task_split("toy")
SEEN_T1 = [TOY.label(c) for c in TOY.seen(1)]


# --- energy -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [0.5, 1.0, 1.5, 10.0])
def test_energy_matches_naive_formula(T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, TOY.num_classes + 2, generator=g, dtype=torch.float64) * 4
    logits[:, SEEN_T1[-1] + 1:TOY.unknown_label] = float("-inf")  # masked classes are ignored
    got = energy(logits, SEEN_T1, T)
    for row, e in zip(logits.tolist(), got.tolist()):
        # Only the seen known classes: background (0) and unknown (K+1) are left out.
        want = -T * math.log(sum(math.exp(row[i] / T) for i in SEEN_T1))
        assert e == pytest.approx(want, rel=1e-6, abs=1e-9)
    # Stable where exp overflows in fp32: large logits give E ≈ −max logit.
    big = torch.full((1, TOY.num_classes + 2), 1000.0)
    assert float(energy(big, SEEN_T1, 1.0)) == pytest.approx(-1000.0 - math.log(5), rel=1e-6)
    with pytest.raises(ValueError):
        energy(logits, SEEN_T1, 0.0)


# --- Weibull fits -------------------------------------------------------------------------

CASES = [(1.5, -3.0, 2.0), (2.5, -10.0, 4.0), (4.0, -50.0, 10.0), (1.2, 5.0, 0.5),
         (3.0, -2.0, 1.0)]


@pytest.mark.parametrize("shape,loc,scale", CASES)
def test_fit_recovers_weibull_parameters(shape, loc, scale):
    x = stats.weibull_min.rvs(shape, loc=loc, scale=scale, size=20_000, random_state=7)
    fit, ll = fit_weibull3(x)
    assert fit.shape == pytest.approx(shape, rel=0.05)
    assert fit.scale == pytest.approx(scale, rel=0.05)
    assert abs(fit.loc - loc) < 0.05 * scale
    assert fit.loc < x.min()  # every sample inside the support
    assert ll == pytest.approx(stats.weibull_min.logpdf(x, shape_c := fit.shape, fit.loc,
                                                        fit.scale).sum(), rel=1e-9)
    assert shape_c > 0


@pytest.mark.parametrize("shape,loc,scale", [*CASES[:3], (0.8, -1.0, 1.0)])
def test_fit_likelihood_at_least_scipy_default_fit(shape, loc, scale):
    x = stats.weibull_min.rvs(shape, loc=loc, scale=scale, size=5_000, random_state=3)
    _, ll = fit_weibull3(x)
    ll_scipy = stats.weibull_min.logpdf(x, *stats.weibull_min.fit(x)).sum()
    assert ll >= ll_scipy - 1e-7 * abs(ll_scipy)


def test_fit_handles_negative_energies_and_small_sets(caplog):
    x = -np.abs(stats.weibull_min.rvs(2.0, loc=5.0, scale=1.0, size=60, random_state=0))
    with caplog.at_level(logging.WARNING):
        fit, _ = fit_weibull3(x, "the unknown set")
    assert "only 60 samples" in caplog.text and np.isfinite(fit.logpdf(x)).all()
    with pytest.raises(OreError, match="distinct"):
        fit_weibull3(np.array([1.0, 1.0, 2.0, 2.0, 3.0]), "the known set")
    with pytest.raises(OreError, match="known set"):
        fit_weibull3(np.array([]), "the known set")


def test_weibull_logpdf_numpy_and_torch_agree_with_scipy():
    w = Weibull3(shape=1.7, loc=-2.0, scale=3.0)
    x = np.array([-5.0, -2.0, -1.5, 0.0, 4.0, 20.0])
    want = stats.weibull_min.logpdf(x, 1.7, -2.0, 3.0)
    np.testing.assert_allclose(w.logpdf(x), want, rtol=1e-9)
    np.testing.assert_allclose(w.logpdf(torch.from_numpy(x)).numpy(), want, rtol=1e-9)


# --- the fit file -------------------------------------------------------------------------

def make_fit(known=(3.0, 2.0, 2.0), unknown=(2.0, -1.0, 2.0), T=1.5, seen=TOY.seen(1)):
    return EnergyFit(temperature=T, mode="labelled", seen_classes=list(seen),
                     known=Weibull3(*known), unknown=Weibull3(*unknown),
                     counts={"known": 10, "unknown": 5},
                     log_likelihood={"known": -1.0, "unknown": -2.0})


def test_fit_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    fit = fit_energies(rng.weibull(3.0, 400) * 2 + 1, rng.weibull(1.5, 300) - 0.5,
                       temperature=1.5, mode="pseudo", seen_classes=TOY.seen(2))
    path = fit.save(tmp_path / "energy_fit.json")
    data = json.loads(path.read_text())
    assert data["counts"] == {"known": 400, "unknown": 300} and data["temperature"] == 1.5
    assert data["variable"] == "negative_energy" and data["mode"] == "pseudo"
    back = EnergyFit.load(path)
    assert back == fit and back.to_dict() == fit.to_dict()


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    ("{not json", "not a readable JSON"),
    ("[1, 2]", "not an ORE energy fit"),
    ('{"format": "ore-energy-fit", "version": 9}', "version 9"),
])
def test_missing_or_corrupt_fit_file_errors(tmp_path, content, match):
    path = tmp_path / "energy_fit.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(OreError, match=match):
        EnergyFit.load(path)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["known"].update(shape=-1.0), "known.shape"),
    (lambda d: d["unknown"].pop("scale"), "unknown.scale"),
    (lambda d: d.update(mode="oracle"), "mode"),
    (lambda d: d.update(temperature="hot"), "temperature"),
    (lambda d: d.update(seen_classes=[]), "seen_classes"),
])
def test_malformed_fit_file_names_the_key(tmp_path, edit, match):
    data = make_fit().to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OreError, match=match) as info:
        EnergyFit.load(path)
    assert "\n" not in str(info.value)


def ebui_cfg(fit_file, *extra):
    return load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore", "EBUI.ENABLED=true",
                                             f"EBUI.FIT_FILE={fit_file}", *extra])


def test_build_detector_refuses_a_bad_or_mismatched_fit(tmp_path):
    good = make_fit().save(tmp_path / "fit.json")
    build_detector(ebui_cfg(good), TOY)  # fine
    with pytest.raises(OreError, match="not found"):
        build_detector(ebui_cfg(tmp_path / "missing.json"), TOY)
    with pytest.raises(OreError, match="FIT_FILE is empty"):
        build_detector(ebui_cfg(""), TOY)
    with pytest.raises(OreError, match="temperature 1.5 .* EBUI.TEMPERATURE is 1"):
        build_detector(ebui_cfg(good, "EBUI.TEMPERATURE=1.0"), TOY)
    with pytest.raises(OreError, match="task 2 sees 10"):
        build_detector(ebui_cfg(good, "OWOD.TASK=2"), TOY)
    with pytest.raises(OreError, match="NAME=ore"):
        build_detector(ebui_cfg(good, "MODEL.ROI_HEADS.NAME=standard"), TOY)
    # Switched off explicitly: no file needed.
    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore", "EBUI.FIT_FILE=nope"])
    assert build_detector(cfg, TOY).roi_heads.relabeller is None


def test_cli_reports_a_missing_fit_file_in_one_line(tmp_path, capsys):
    code = main(["evaluate", "--config", "toy/t1_train.yaml", "--weights", "w.pth",
                 "EBUI.ENABLED=true", f"EBUI.FIT_FILE={tmp_path / 'none.json'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: energy fit file not found") and err.count("\n") == 1


# --- relabelling --------------------------------------------------------------------------

def logits_for(s_values, T=1.5):
    """Logits whose negated energy over the 5 seen classes of task 1 is exactly ``s``."""
    s = torch.tensor(s_values, dtype=torch.float64)
    out = torch.full((len(s), TOY.num_classes + 2), float("-inf"), dtype=torch.float64)
    out[:, 0] = 0.0
    out[:, TOY.unknown_label] = 0.0
    out[:, SEEN_T1] = (s - T * math.log(len(SEEN_T1)))[:, None]  # equal seen logits
    return out


def test_relabelling_follows_the_densities_and_dedups():
    # Known fit lives on s > 2, unknown on s > −1: low s is unknown-only, high s known.
    fit = make_fit(known=(3.0, 2.0, 2.0), unknown=(2.0, -1.0, 2.0))
    relabel = EnergyRelabeller(fit, SEEN_T1, TOY.unknown_label)
    s = [0.0, 5.0, 0.5, 1.0, 6.0, -3.0]
    dens_k, dens_u = fit.known.logpdf(np.array(s)), fit.unknown.logpdf(np.array(s))
    assert dens_u[0] > dens_k[0] and dens_k[1] > dens_u[1]  # the hand-built picture holds
    assert dens_k[5] == dens_u[5] == -np.inf  # outside both supports: left alone
    det = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60],
                               [0.5, 0, 10, 10], [70, 70, 80, 80], [90, 90, 95, 95]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6, 0.5]),
        # box 3 is already `unknown` and overlaps box 0, which will be relabelled.
        "labels": torch.tensor([1, 2, 3, TOY.unknown_label, 4, 5]),
        "logits": logits_for(s),
        "features": torch.arange(6.0)[:, None],
    }
    out = relabel(det, nms_thresh=0.5)
    U = TOY.unknown_label
    # Box 0 became unknown and lost to the overlapping unknown box 3 (higher score).
    assert out["features"].flatten().tolist() == [3.0, 1.0, 2.0, 4.0, 5.0]
    assert out["labels"].tolist() == [U, 2, U, 4, 5]
    assert bool((out["scores"][:-1] >= out["scores"][1:]).all())
    # Nothing to relabel: the detections come back as they were.
    same = relabel({**det, "logits": logits_for([4.0] * 6)}, nms_thresh=0.5)
    assert same["labels"].tolist() == det["labels"].tolist()


def test_ebui_in_the_model_relabels_to_unknown_without_duplicates(tmp_path):
    # An unknown fit that dominates everywhere the known one is zero: every known-class
    # detection of an untrained model (s ≈ T·log 5) must become unknown.
    fit = make_fit(known=(2.0, 50.0, 1.0), unknown=(1.2, -20.0, 10.0))
    cfg = ebui_cfg(fit.save(tmp_path / "fit.json"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0")
    torch.manual_seed(0)
    model = build_detector(cfg, TOY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model([torch.rand((3, 96, 128), generator=g) for _ in range(2)])
    from torchvision.ops import box_iou
    for o in out:
        assert len(o["labels"]) > 0 and (o["labels"] == TOY.unknown_label).all()
        iou = box_iou(o["boxes"], o["boxes"]).fill_diagonal_(0)
        assert float(iou.max()) <= cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST + 1e-6
    # The relabeller holds no tensors: the state dict is unchanged.
    assert not any("relabel" in k for k in model.state_dict())


# --- sample collection and the command ----------------------------------------------------

def test_pseudo_mode_never_reads_unknown_labels():
    from ore.engine.energy_fit import rois_energies

    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore"])
    torch.manual_seed(0)
    model = build_detector(cfg, TOY).eval()
    g = torch.Generator().manual_seed(2)
    images = [torch.rand((3, 128, 160), generator=g)]
    known = torch.tensor([[10.0, 12.0, 60.0, 70.0]])
    unk = torch.tensor([[80.0, 20.0, 150.0, 110.0]])
    kw = dict(seen_labels=SEEN_T1, unknown_label=TOY.unknown_label, temperature=1.5)
    with_unk = [{"boxes": torch.cat([known, unk]),
                 "labels": torch.tensor([1, TOY.unknown_label])}]
    without = [{"boxes": known, "labels": torch.tensor([1])}]
    a = rois_energies(model, images, with_unk, mode="pseudo", **kw)
    b = rois_energies(model, images, without, mode="pseudo", **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert len(a[1]) > 0  # the auto-labelled unknown box matches at least itself
    # Labelled mode: known samples are the same; unknown samples come from the labelled box.
    lab = rois_energies(model, images, with_unk, mode="labelled", **kw)
    torch.testing.assert_close(lab[0], a[0])
    assert len(rois_energies(model, images, without, mode="labelled", **kw)[1]) == 0


@pytest.mark.parametrize("mode", ["labelled", "pseudo"])
def test_fit_energy_command_writes_json_and_png(toy_root, tmp_path, mode, capsys):
    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore"])
    torch.manual_seed(0)
    model = build_detector(cfg, TOY)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(cfg, TOY)}, weights)
    out = tmp_path / mode
    args = ["fit-energy", "--config", "toy/t1_train.yaml", "--weights", str(weights),
            "--split", "all_task_test", "--mode", mode, "--output", str(out),
            f"DATASETS.ROOT={toy_root}", "DATALOADER.NUM_WORKERS=0"]
    assert main(args) == 0
    data = json.loads((out / "energy_fit.json").read_text())
    assert data["mode"] == mode and data["seen_classes"] == list(TOY.seen(1))
    assert data["counts"]["known"] > 0 and data["counts"]["unknown"] > 0
    assert (out / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "known" in capsys.readouterr().out
    EnergyFit.load(out / "energy_fit.json")  # readable by the inference side


def test_run_tasks_step_fits_then_evaluates_with_ebui(toy_root, tmp_path):
    from ore.config import CONFIG_ROOT
    from ore.engine.tasks import _fit_and_evaluate_ebui, format_summary

    overrides = ["MODEL.ROI_HEADS.NAME=ore", f"DATASETS.ROOT={toy_root}",
                 "DATALOADER.NUM_WORKERS=0"]
    cfg = load_config(CONFIG_ROOT / "toy" / "t1_train.yaml", overrides)
    torch.manual_seed(0)
    stage = tmp_path / "t1_train"
    stage.mkdir()
    weights = stage / "model_final.pth"
    torch.save({"model": build_detector(cfg, TOY).state_dict(),
                "meta": checkpoint_meta(cfg, TOY)}, weights)
    result = _fit_and_evaluate_ebui(CONFIG_ROOT / "toy" / "t1_train.yaml", overrides, stage,
                                    weights, True)
    fit = EnergyFit.load(stage / "energy" / "energy_fit.json")
    assert fit.extra["split"] == "all_task_val" and fit.mode == "labelled"
    assert (stage / "eval_ebui.json").is_file() and "unknown_recall" in result
    table = format_summary({"t1": {"train": result, "ft": None, "ebui": result}})
    assert "t1 ebui" in table


def test_counts_prior_weighs_the_densities_by_the_fit_sample_shares(tmp_path):
    from ore.modeling.energy import build_relabeller

    fit = make_fit()  # counts: 10 known, 5 unknown
    fit.save(tmp_path / "fit.json")
    s = np.linspace(-0.9, 8.0, 400)
    log_k, log_u = fit.known.logpdf(s), fit.unknown.logpdf(s)
    for prior, log_ratio in (("equal", 0.0), ("counts", math.log(5 / 10))):
        cfg = ebui_cfg(tmp_path / "fit.json", f"EBUI.PRIOR={prior}")
        relabel = build_relabeller(cfg.EBUI, TOY, 1)
        got = relabel.is_unknown(logits_for(s.tolist())).numpy()
        expected = log_u + log_ratio > log_k  # the decision written from the formula
        assert (got == expected).all()
    # The prior moves the boundary: some RoIs unknown under equal priors stay known.
    assert ((log_u > log_k) & ~(log_u + math.log(0.5) > log_k)).any()
    with pytest.raises(OreError, match=r"EBUI.PRIOR: 'flat'; expected one of"):
        build_relabeller(ebui_cfg(tmp_path / "fit.json", "EBUI.PRIOR=flat").EBUI, TOY, 1)
    fit.counts = {}
    fit.save(tmp_path / "nocounts.json")
    with pytest.raises(OreError, match="EBUI.PRIOR=counts needs the sample counts"):
        build_relabeller(ebui_cfg(tmp_path / "nocounts.json", "EBUI.PRIOR=counts").EBUI,
                         TOY, 1)
