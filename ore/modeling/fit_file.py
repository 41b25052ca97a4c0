"""The energy fit file (``energy_fit.json``): both Weibull fits and what they were fitted on.

A versioned JSON document (never a pickle), validated field by field when read: a
missing, unreadable or malformed file is a one-line :class:`~ore.errors.OreError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ore.errors import OreError
from ore.fileio import atomic_write_json
from ore.modeling.weibull import Weibull3, fit_weibull3

FIT_FORMAT = "ore-energy-fit"
FIT_VERSION = 1
MODES = ("labelled", "pseudo")


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
    """Fit a 3-parameter Weibull (:func:`~ore.modeling.weibull.fit_weibull3`) to each set
    of negated energies s = −E (:func:`~ore.modeling.energy.energy`)."""
    known, ll_k = fit_weibull3(known_s, "the known set")
    unknown, ll_u = fit_weibull3(unknown_s, "the unknown set")
    return EnergyFit(
        temperature=float(temperature), mode=mode, seen_classes=list(seen_classes),
        known=known, unknown=unknown,
        counts={"known": int(np.isfinite(known_s).sum()),
                "unknown": int(np.isfinite(unknown_s).sum())},
        log_likelihood={"known": ll_k, "unknown": ll_u},
    )
