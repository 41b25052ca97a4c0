"""Hyperparameter checks shared by the loss constructors (ValueError naming the value)."""

from __future__ import annotations

import functools
import math

import torch

# Below this the logits of unit vectors exceed ~1e6 and fp32 cross-entropy loses meaning.
MIN_TEMPERATURE = 1e-4


def check_temperature(temperature: float, name: str = "temperature") -> float:
    t = float(temperature)
    if not math.isfinite(t) or t < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be a finite number ≥ {MIN_TEMPERATURE}, got {temperature}")
    return t


def check_margin(margin: float) -> float:
    m = float(margin)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"margin must be a finite number ≥ 0, got {margin}")
    return m


def check_tau_plus(tau_plus: float) -> float:
    """τ⁺ of the debiased contrastive loss: the prior probability that a negative shares
    the anchor's class; 0 turns the correction off."""
    t = float(tau_plus)
    if not 0.0 <= t < 1.0:
        raise ValueError(f"debiased (τ⁺) must be in [0, 1), got {tau_plus}")
    return t


def check_denominator(decoupled: bool, debiased: float) -> tuple[bool, float]:
    """DCL's ``decoupled`` flag and the debiased loss's τ⁺, which exclude each other."""
    decoupled, tau_plus = bool(decoupled), check_tau_plus(debiased)
    if decoupled and tau_plus:
        raise ValueError("decoupled and debiased are two different denominators; choose one")
    return decoupled, tau_plus


def fp32_loss(forward):
    """Run a loss's forward with autocast off and half-precision inputs cast to fp32.

    Logits divided by a small temperature do not fit bf16's 8-bit mantissa; fp64 inputs
    (gradcheck) are left as they are.
    """
    def cast(a):
        if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16):
            return a.float()
        return a

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        device = next(
            (a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu"
        )
        with torch.autocast(device_type=device, enabled=False):
            return forward(
                self, *(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()}
            )

    return wrapper
