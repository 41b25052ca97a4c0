"""Energy-based unknown identifier (EBUI, SPEC §3.3): energies, Weibull fits, relabelling.

Shapes: N detections or RoI samples; C = K + 2 classifier outputs (0 background,
1..K classes, K+1 unknown); S seen known classes.

Energy of a RoI from its logits g over the *seen known classes only* (background and
``unknown`` are left out, as in the reference)::

    E(g) = −T · log Σ_{i ∈ seen} exp(g_i / T)

The same temperature T is used to fit and at inference (the reference fitted with 1.5
and scored with 1). Known objects have low energy. The Weibulls are fitted to the
*negated* energy s = −E (what the reference fitted): a 3-parameter Weibull
(shape c, location μ, scale λ) with density

    f(s) = c/λ · ((s − μ)/λ)^(c−1) · exp(−((s − μ)/λ)^c),   s > μ.

The location is free, so negative values of s are fine: the fit standardises the data
internally and keeps μ below the smallest sample (the reference's fitter crashed on
non-positive values). A known-class detection is relabelled ``unknown`` when its density
under the unknown fit exceeds its density under the known fit (compared as log
densities; where both are 0 nothing changes).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import boxes as box_ops

from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FIT_FORMAT = "ore-energy-fit"
FIT_VERSION = 1
MODES = ("labelled", "pseudo")
# Fewer samples than this in a set give a fit worth little: warn.
MIN_SAMPLES_WARN = 100
# A 3-parameter fit needs at least this many distinct values.
MIN_SAMPLES = 5


def energy(logits: torch.Tensor, seen_labels: Sequence[int], temperature: float) -> torch.Tensor:
    """E = −T · logsumexp(logits[:, seen] / T) → [N].

    Args:
        logits: [N, C] classifier logits (masked classes may be −inf; they are not read).
        seen_labels: label indices of the seen known classes (1..K).
        temperature: T > 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    idx = torch.as_tensor(list(seen_labels), dtype=torch.long, device=logits.device)
    g = logits.index_select(-1, idx).float()  # [N, S]
    return -temperature * torch.logsumexp(g / temperature, dim=-1)


# --- 3-parameter Weibull ------------------------------------------------------------------

@dataclass(frozen=True)
class Weibull3:
    """A 3-parameter Weibull: ``shape`` c > 0, ``loc`` μ, ``scale`` λ > 0."""

    shape: float
    loc: float
    scale: float

    def logpdf(self, x):
        """log f(x) for a numpy array or a torch tensor; −inf where x ≤ loc."""
        if isinstance(x, torch.Tensor):
            y = ((x.double() - self.loc) / self.scale)
            pos = y > 0
            y = y.clamp(min=1e-300)
            out = (math.log(self.shape / self.scale) + (self.shape - 1) * torch.log(y)
                   - y.pow(self.shape))
            return torch.where(pos, out, torch.full_like(out, -math.inf))
        y = (np.asarray(x, np.float64) - self.loc) / self.scale
        pos = y > 0
        yc = np.where(pos, y, 1.0)
        out = math.log(self.shape / self.scale) + (self.shape - 1) * np.log(yc) - yc**self.shape
        return np.where(pos, out, -np.inf)

    def pdf(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.logpdf(x))

    def log_likelihood(self, x: np.ndarray) -> float:
        return float(np.sum(self.logpdf(x)))


def _nll_and_grad(theta: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood of standardised data ``z`` (min 0) and its gradient.

    theta = (log c, log λ, log γ) with location μ = −γ, so μ < min(z) always holds.
    """
    a, b, g = theta
    c, lam, gap = math.exp(a), math.exp(b), math.exp(g)
    y = (z + gap) / lam  # > 0
    t = np.log(y)
    u = np.exp(c * t)  # y^c
    n = len(z)
    nll = -(n * (a - b) + (c - 1) * t.sum() - u.sum()) / n
    # d log f / d c, d λ, d μ (μ = −γ) summed, then chained to the log parameters.
    d_c = n / c + t.sum() - (u * t).sum()
    d_lam = (c / lam) * (u.sum() - n)
    d_mu = ((c * u - (c - 1)) / y).sum() / lam
    grad = -np.array([d_c * c, d_lam * lam, -d_mu * gap]) / n
    return float(nll), grad


def _start_values(z_sorted: np.ndarray) -> np.ndarray:
    """Robust starting point: Weibull-plot (median-rank) regression at several locations,
    keeping the one with the best likelihood."""
    n = len(z_sorted)
    pick = np.unique(np.linspace(0, n - 1, min(n, 2000)).round().astype(int))
    q = z_sorted[pick]
    F = (pick + 1 - 0.3) / (n + 0.4)
    w = np.log(-np.log1p(-F))
    best, best_nll = None, math.inf
    for gap in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        lx = np.log(q + gap)
        slope, intercept = np.polyfit(lx, w, 1)
        c = float(np.clip(slope, 0.1, 100.0))
        lam = math.exp(-intercept / slope) if slope > 0 else float(np.mean(q + gap))
        theta = np.array([math.log(c), math.log(lam), math.log(gap)])
        nll, _ = _nll_and_grad(theta, z_sorted)
        if math.isfinite(nll) and nll < best_nll:
            best, best_nll = theta, nll
    return best


def fit_weibull3(x, name: str = "samples") -> tuple[Weibull3, float]:
    """Maximum-likelihood 3-parameter Weibull of ``x`` → (fit, total log-likelihood).

    The data are shifted to start at 0 and scaled to unit spread; the optimiser works on
    (log c, log λ, log γ) with μ = min(x) − γ, so every parameter stays valid. A shape
    below 1 makes the likelihood unbounded as μ → min(x); the gap γ is kept ≥ 1e-6 of the
    spread there. Raises :class:`OreError` when ``x`` has too few distinct values.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64).ravel()
    finite = np.isfinite(x)
    if not finite.all():
        log.warning("%s: %d non-finite values left out of the fit", name, int((~finite).sum()))
        x = x[finite]
    if len(np.unique(x)) < MIN_SAMPLES:
        raise OreError(f"energy fit: {name} has {len(x)} samples ({len(np.unique(x))} distinct); "
                       f"a 3-parameter Weibull needs at least {MIN_SAMPLES} distinct values")
    if len(x) < MIN_SAMPLES_WARN:
        log.warning("energy fit: %s has only %d samples (< %d); the fit is unreliable",
                    name, len(x), MIN_SAMPLES_WARN)
    lo, spread = float(x.min()), float(x.std())
    z = np.sort((x - lo) / spread)
    theta0 = _start_values(z)
    bounds = [(math.log(0.05), math.log(200.0)), (None, None), (math.log(1e-6), math.log(1e4))]
    res = minimize(_nll_and_grad, theta0, args=(z,), jac=True, method="L-BFGS-B",
                   bounds=bounds, options={"maxiter": 500, "ftol": 1e-13, "gtol": 1e-9})
    theta = res.x if res.fun <= _nll_and_grad(theta0, z)[0] else theta0
    c, lam, gap = (math.exp(v) for v in theta)
    fit = Weibull3(shape=c, loc=lo - gap * spread, scale=lam * spread)
    return fit, fit.log_likelihood(x)


# --- the fit file -------------------------------------------------------------------------

@dataclass
class EnergyFit:
    """Both Weibull fits of the negated energy, with what they were fitted on.

    Attributes:
        temperature: T used for the energies (and to be used at inference).
        mode: ``labelled`` or ``pseudo`` (what counted as an unknown sample).
        seen_classes: names of the classes whose logits make the energy.
        known, unknown: the fits.
        counts: samples per set; log_likelihood: total log-likelihood per set.
    """

    temperature: float
    mode: str
    seen_classes: list[str]
    known: Weibull3
    unknown: Weibull3
    counts: dict[str, int] = field(default_factory=dict)
    log_likelihood: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FIT_FORMAT, "version": FIT_VERSION,
            "variable": "negative_energy",  # s = -E = T * logsumexp(seen logits / T)
            "temperature": self.temperature, "mode": self.mode,
            "seen_classes": list(self.seen_classes),
            "known": asdict(self.known), "unknown": asdict(self.unknown),
            "counts": dict(self.counts), "log_likelihood": dict(self.log_likelihood),
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data, source: str = "energy fit") -> EnergyFit:
        def need(d, key, where):
            if not isinstance(d, dict) or key not in d:
                raise OreError(f"{source}: missing key {where}{key}")
            return d[key]

        def number(d, key, where="", positive=False):
            v = need(d, key, where)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (positive and v <= 0):
                kind = "a positive number" if positive else "a finite number"
                raise OreError(f"{source}: {where}{key} is {v!r}; expected {kind}")
            return float(v)

        if not isinstance(data, dict) or data.get("format") != FIT_FORMAT:
            raise OreError(f"{source}: not an ORE energy fit (no \"format\": \"{FIT_FORMAT}\")")
        if data.get("version") != FIT_VERSION:
            raise OreError(f"{source}: version {data.get('version')!r}; expected {FIT_VERSION}")
        mode = need(data, "mode", "")
        if mode not in MODES:
            raise OreError(f"{source}: mode {mode!r}; expected one of {MODES}")
        seen = need(data, "seen_classes", "")
        if not isinstance(seen, list) or not seen or not all(isinstance(s, str) for s in seen):
            raise OreError(f"{source}: seen_classes must be a non-empty list of class names")
        fits = {}
        for key in ("known", "unknown"):
            d = need(data, key, "")
            fits[key] = Weibull3(shape=number(d, "shape", f"{key}.", True),
                                 loc=number(d, "loc", f"{key}."),
                                 scale=number(d, "scale", f"{key}.", True))
        return cls(
            temperature=number(data, "temperature", positive=True), mode=mode,
            seen_classes=seen, known=fits["known"], unknown=fits["unknown"],
            counts=dict(data.get("counts") or {}),
            log_likelihood=dict(data.get("log_likelihood") or {}),
            extra=dict(data.get("extra") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> EnergyFit:
        """Read a fit file; a missing, unreadable or malformed file is an :class:`OreError`."""
        p = Path(path)
        if not str(path) or not p.is_file():
            raise OreError(f"energy fit file not found: {path} (run `ore fit-energy`, "
                           "or set EBUI.ENABLED=false)")
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OreError(f"{p}: not a readable JSON energy fit ({type(exc).__name__})") from None
        return cls.from_dict(data, str(p))


def fit_energies(known_s: np.ndarray, unknown_s: np.ndarray, *, temperature: float, mode: str,
                 seen_classes: Sequence[str]) -> EnergyFit:
    """Fit both sets of negated energies (see the module docstring)."""
    known, ll_k = fit_weibull3(known_s, "the known set")
    unknown, ll_u = fit_weibull3(unknown_s, "the unknown set")
    return EnergyFit(
        temperature=float(temperature), mode=mode, seen_classes=list(seen_classes),
        known=known, unknown=unknown,
        counts={"known": int(np.isfinite(known_s).sum()),
                "unknown": int(np.isfinite(unknown_s).sum())},
        log_likelihood={"known": ll_k, "unknown": ll_u},
    )


def plot_energy(known_s: np.ndarray, unknown_s: np.ndarray, fit: EnergyFit,
                path: str | Path) -> Path:
    """Both histograms of the negated energy with the fitted densities, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = np.concatenate([known_s, unknown_s])
    lo, hi = np.percentile(both, [0.5, 99.5])
    pad = 0.05 * (hi - lo + 1e-9)
    grid = np.linspace(lo - pad, hi + pad, 400)
    bins = np.linspace(lo - pad, hi + pad, 60)
    fig, ax = plt.subplots(figsize=(7, 4))
    for s, w, color, name in ((known_s, fit.known, "tab:blue", "known"),
                              (unknown_s, fit.unknown, "tab:red", "unknown")):
        ax.hist(s, bins=bins, density=True, alpha=0.35, color=color,
                label=f"{name} ({len(s)} samples)")
        ax.plot(grid, w.pdf(grid), color=color,
                label=f"{name} Weibull c={w.shape:.2f} μ={w.loc:.2f} λ={w.scale:.2f}")
    ax.set_xlabel(f"negative energy  T·logsumexp(seen logits / T),  T = {fit.temperature:g}")
    ax.set_ylabel("density")
    ax.set_title(f"EBUI energy fit ({fit.mode})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glyph warnings on minimal font setups
            return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# --- inference ----------------------------------------------------------------------------

class EnergyRelabeller:
    """Relabels known-class detections as ``unknown`` by their energy, then re-runs NMS.

    A plain object, not an ``nn.Module``: it holds no tensors, so it never enters a
    checkpoint's state dict and follows the detections' device.

    Args:
        fit: the energy fit.
        seen_labels: label indices of the seen known classes (energy and "known-class").
        unknown_label: K + 1.
    """

    def __init__(self, fit: EnergyFit, seen_labels: Sequence[int], unknown_label: int):
        self.fit = fit
        self.seen_labels = list(seen_labels)
        self.unknown_label = unknown_label

    def is_unknown(self, logits: torch.Tensor) -> torch.Tensor:
        """[N] bool: density under the unknown fit > density under the known fit."""
        s = -energy(logits, self.seen_labels, self.fit.temperature)  # [N]
        return self.fit.unknown.logpdf(s) > self.fit.known.logpdf(s)

    def __call__(self, det: dict, nms_thresh: float) -> dict:
        """One image's detections (``boxes``, ``scores``, ``labels``, ``logits``, …) →
        the same keys, relabelled, deduplicated by class-aware NMS, best score first."""
        if len(det["labels"]) == 0:
            return det
        labels = det["labels"]
        known = (labels > 0) & (labels != self.unknown_label)
        flip = known & self.is_unknown(det["logits"]).to(labels.device)
        if not bool(flip.any()):
            return det
        labels = torch.where(flip, torch.full_like(labels, self.unknown_label), labels)
        out = {**det, "labels": labels}
        keep = box_ops.batched_nms(out["boxes"], out["scores"], labels, nms_thresh)
        return {k: v[keep] for k, v in out.items()}


def build_relabeller(ebui_cfg, split, task: int) -> EnergyRelabeller:
    """The relabeller of ``cfg.EBUI`` for ``task``; one-line errors for a missing or
    mismatched fit file."""
    if not ebui_cfg.FIT_FILE:
        raise OreError("EBUI.ENABLED is true but EBUI.FIT_FILE is empty "
                       "(run `ore fit-energy`, or set EBUI.ENABLED=false)")
    fit = EnergyFit.load(ebui_cfg.FIT_FILE)
    seen = list(split.seen(task))
    if fit.seen_classes != seen:
        raise OreError(
            f"{ebui_cfg.FIT_FILE}: fitted for {len(fit.seen_classes)} seen classes "
            f"({fit.seen_classes[:3]}…), but task {task} sees {len(seen)} ({seen[:3]}…)"
        )
    if not math.isclose(fit.temperature, float(ebui_cfg.TEMPERATURE), rel_tol=1e-9):
        raise OreError(
            f"{ebui_cfg.FIT_FILE}: fitted with temperature {fit.temperature:g} but "
            f"EBUI.TEMPERATURE is {float(ebui_cfg.TEMPERATURE):g}; use the same T for both"
        )
    return EnergyRelabeller(fit, [split.label(c) for c in seen], split.unknown_label)
