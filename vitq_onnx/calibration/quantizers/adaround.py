"""Learned rounding (AdaRound, Nagel et al. 2020), the weight parameterization of BRECQ, QDrop
and FIMA-Q's block reconstruction: each weight's code is its floor or its ceiling, chosen by a
trained gate h(alpha) in [0, 1] that a penalty drives to 0 or 1. A latent weight trained through
straight-through rounding may wander several steps from where it started; a gate cannot leave
its two neighbours, which is what keeps few calibration images from being overfitted.
"""

from __future__ import annotations

import torch

from ...codes.weights import weight_range
from .weights import channel_view

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 exactly


def gate(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha): the soft rounding offset in [0, 1]."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def start(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's floor code, and the alpha whose gate is its fractional part (so that the soft
    weight starts at the float weight)."""
    x = w / channel_view(scale, w)
    base = torch.floor(x)
    frac = (x - base).clamp(1e-4, 1 - 1e-4)
    return base, -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def soft_weight(base: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = weight_range(bits)
    return torch.clamp(base + gate(alpha), lo, hi) * channel_view(scale, base)


def codes(base: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """The hard codes: floor, or ceiling where the gate passed one half (alpha >= 0)."""
    lo, hi = weight_range(bits)
    return torch.clamp(base + (alpha >= 0).to(base.dtype), lo, hi)


def penalty(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero where every gate is 0 or 1; a high beta leaves gates near one
    half free and pulls only those already near 0 or 1, a low beta pulls them all."""
    return (1 - (2 * gate(alpha) - 1).abs().pow(beta)).sum()


def beta_at(step: int, steps: int, warmup: float = 0.2, high: float = 20.0, low: float = 2.0) -> float | None:
    """The penalty's beta at ``step`` of ``steps``: none for the first ``warmup`` of them, then
    falling linearly from ``high`` to ``low``."""
    first = warmup * steps
    if step < first:
        return None
    return low + (high - low) * max(0.0, 1 - (step - first) / max(1.0, steps - first))
