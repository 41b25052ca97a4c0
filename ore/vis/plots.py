"""Plots of a run's numbers: energy histograms with their Weibull fits, training curves.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state, no display
needed) and written atomically as PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ore.fileio import atomic_write
from ore.modeling.fit_file import EnergyFit


def plot_energy(known_s: np.ndarray, unknown_s: np.ndarray, fit: EnergyFit,
                path: str | Path) -> Path:
    """Both histograms of the negated energy with the fitted densities, as a PNG."""
    both = np.concatenate([known_s, unknown_s])
    lo, hi = np.percentile(both, [0.5, 99.5])
    pad = 0.05 * (hi - lo + 1e-9)
    grid = np.linspace(lo - pad, hi + pad, 400)
    bins = np.linspace(lo - pad, hi + pad, 60)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyph warnings on minimal font setups
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_curves(records: list[dict], path: str | Path, title: str) -> Path:
    """Pretraining loss per epoch and, when the records carry it, kNN top-1 per epoch
    (``curves.png``)."""
    knn = [r for r in records if "knn_cosine_top1" in r]
    fig = Figure(figsize=(9 if knn else 4.5, 3.2))
    axes = fig.subplots(1, 2 if knn else 1, squeeze=False)[0]
    axes[0].plot([r["epoch"] for r in records], [r["loss"] for r in records], marker="o")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    if knn:
        for key, label in (("knn_cosine_top1", "cosine k=200"), ("knn_l2_top1", "L2 k=5")):
            axes[1].plot([r["epoch"] for r in knn], [100 * r[key] for r in knn], marker="o",
                         label=label)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("kNN top-1 on the test split (%)")
        axes[1].legend(frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
