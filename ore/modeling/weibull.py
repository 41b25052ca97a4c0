"""The 3-parameter Weibull of the energy-based unknown identifier, and its ML fit.

Density of shape c > 0, location μ and scale λ > 0::

    f(s) = c/λ · ((s − μ)/λ)^(c−1) · exp(−((s − μ)/λ)^c),   s > μ.

The location is free, so negative samples are fine: the fit standardises the data
internally and keeps μ below the smallest sample (the reference's fitter crashed on
non-positive values).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from ore.errors import OreError

log = logging.getLogger(__name__)

# Fewer samples than this in a set give a fit worth little: warn.
MIN_SAMPLES_WARN = 100
# A 3-parameter fit needs at least this many distinct values.
MIN_SAMPLES = 5


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
