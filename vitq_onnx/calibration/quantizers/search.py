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


SCORE_IMAGES, SCORE_ROWS = 4, 256  # attention maps a post-Softmax fit scores its candidates on


def attention_sample(x: torch.Tensor, v: torch.Tensor | None):
    """At most SCORE_IMAGES images and SCORE_ROWS query rows (a fixed random set) of attention
    maps ``x`` [B, H, N, N], and the values ``v`` they multiply: a post-Softmax fit scores each
    candidate on ``xs @ vs`` at a cost that stops growing with the token count (every key stays,
    so each sampled row is still a whole probability distribution)."""
    n = min(len(x), SCORE_IMAGES)
    xs = x[:n]
    if xs.shape[-2] > SCORE_ROWS:
        gen = torch.Generator(device=x.device).manual_seed(0)
        rows = torch.randperm(xs.shape[-2], generator=gen, device=x.device)[:SCORE_ROWS].sort().values
        xs = xs[..., rows, :]
    return xs.float(), None if v is None else v[:n].float()


def alphas(count: int, floor: float) -> torch.Tensor:
    """Clipping ratios from 1 down to ``floor``, geometrically spaced."""
    return torch.logspace(0, math.log10(floor), count)
