"""Shared pieces of the parameter searches: a fixed sample of a tensor and clipping ratios."""

from __future__ import annotations

import math

import torch

SAMPLE = 2**16  # values used to score candidate ranges: a stable MSE at a small cost


def sample(x: torch.Tensor, n: int = SAMPLE) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    if flat.numel() <= n:
        return flat
    gen = torch.Generator(device=flat.device).manual_seed(0)
    return flat[torch.randint(0, flat.numel(), (n,), generator=gen, device=flat.device)]


def alphas(count: int, floor: float) -> torch.Tensor:
    """Clipping ratios from 1 down to ``floor``, geometrically spaced."""
    return torch.logspace(0, math.log10(floor), count)
