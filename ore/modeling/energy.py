"""Energy-based unknown identifier (EBUI, SPEC §3.3): the energy and the relabeller.

Shapes: N detections or RoI samples; C = K + 2 classifier outputs (0 background,
1..K classes, K+1 unknown); S seen known classes.

Energy of a RoI from its logits g over the *seen known classes only* (background and
``unknown`` are left out, as in the reference)::

    E(g) = −T · log Σ_{i ∈ seen} exp(g_i / T)

The same temperature T is used to fit and at inference unless a scoring temperature is
given (the reference fitted with 1.5 and scored with 1). Known objects have low energy.
The Weibulls are fitted to the
*negated* energy s = −E (what the reference fitted), one 3-parameter Weibull
(:mod:`ore.modeling.weibull`) for the known and one for the unknown samples, kept in
a fit file (:mod:`ore.modeling.fit_file`). A known-class detection is relabelled
``unknown`` when its density under the unknown fit exceeds its density under the known
fit (compared as log densities; where both are 0 nothing changes), and class-wise NMS
runs again. The reference's rule (``drop_unknowns``, no ``second_nms``) also drops an
``unknown`` detection whose unknown density does not exceed its known density, and runs
no second NMS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import boxes as box_ops

from ore.errors import OreError
from ore.modeling.fit_file import EnergyFit


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


PRIORS = ("equal", "counts")


class EnergyRelabeller:
    """Relabels known-class detections as ``unknown`` by their energy, then re-runs NMS.

    A plain object, not an ``nn.Module``: it holds no tensors, so it never enters a
    checkpoint's state dict and follows the detections' device.

    Args:
        fit: the energy fit.
        seen_labels: label indices of the seen known classes (energy and "known-class").
        unknown_label: K + 1.
        log_prior_ratio: log P(unknown) − log P(known), added to the unknown side of the
            comparison. 0 compares the two densities (the reference); the log ratio of the
            fit's sample counts makes it the Bayes decision for RoIs distributed like the
            fit's.
        temperature: T of the energies scored (None: the fit's T).
        drop_unknowns: drop ``unknown`` detections that the densities call known.
        second_nms: run class-wise NMS after relabelling.
    """

    def __init__(self, fit: EnergyFit, seen_labels: Sequence[int], unknown_label: int,
                 log_prior_ratio: float = 0.0, *, temperature: float | None = None,
                 drop_unknowns: bool = False, second_nms: bool = True):
        self.fit = fit
        self.seen_labels = list(seen_labels)
        self.unknown_label = unknown_label
        self.log_prior_ratio = float(log_prior_ratio)
        self.temperature = float(fit.temperature if temperature is None else temperature)
        self.drop_unknowns = drop_unknowns
        self.second_nms = second_nms

    def is_unknown(self, logits: torch.Tensor) -> torch.Tensor:
        """[N] bool: log density under the unknown fit + the log prior ratio > log density
        under the known fit."""
        s = -energy(logits, self.seen_labels, self.temperature)  # [N]
        return self.fit.unknown.logpdf(s) + self.log_prior_ratio > self.fit.known.logpdf(s)

    def __call__(self, det: dict, nms_thresh: float) -> dict:
        """One image's detections (``boxes``, ``scores``, ``labels``, ``logits``, …) →
        the same keys, relabelled (and with ``second_nms`` deduplicated by class-aware NMS,
        best score first; otherwise in their order)."""
        if len(det["labels"]) == 0:
            return det
        labels = det["labels"]
        says_unknown = self.is_unknown(det["logits"]).to(labels.device)  # [N]
        known = (labels > 0) & (labels != self.unknown_label)
        flip = known & says_unknown
        drop = (labels == self.unknown_label) & ~says_unknown if self.drop_unknowns else (
            torch.zeros_like(flip))
        if not bool(flip.any()) and not bool(drop.any()):
            return det
        labels = torch.where(flip, torch.full_like(labels, self.unknown_label), labels)
        out = {**det, "labels": labels}
        if bool(drop.any()):
            out = {k: v[~drop] for k, v in out.items()}
        if not (self.second_nms and bool(flip.any())):
            return out
        keep = box_ops.batched_nms(out["boxes"], out["scores"], out["labels"], nms_thresh)
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
    if ebui_cfg.PRIOR not in PRIORS:
        raise OreError(f"EBUI.PRIOR: {ebui_cfg.PRIOR!r}; expected one of {PRIORS}")
    log_ratio = 0.0
    if ebui_cfg.PRIOR == "counts":
        n_known, n_unknown = (int(fit.counts.get(k, 0)) for k in ("known", "unknown"))
        if n_known < 1 or n_unknown < 1:
            raise OreError(f"{ebui_cfg.FIT_FILE}: EBUI.PRIOR=counts needs the sample counts "
                           f"of both sets, the file has {fit.counts or 'none'}")
        log_ratio = math.log(n_unknown / n_known)
    score_t = float(ebui_cfg.SCORE_TEMPERATURE)
    return EnergyRelabeller(fit, [split.label(c) for c in seen], split.unknown_label,
                            log_ratio, temperature=score_t if score_t > 0 else None,
                            drop_unknowns=bool(ebui_cfg.DROP_UNKNOWNS),
                            second_nms=bool(ebui_cfg.SECOND_NMS))
