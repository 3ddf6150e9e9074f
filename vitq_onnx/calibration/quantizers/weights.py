"""Weights: symmetric per-output-channel codes clamp(round(w/scale), -2^(b-1), 2^(b-1)-1)."""

from __future__ import annotations

import torch

from ...codes.weights import weight_range
from .kind import round_ste
from .search import alphas


def channel_view(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel ``scale`` shaped to broadcast against ``w`` (channels on axis 0)."""
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, rounding=torch.round) -> torch.Tensor:
    """Integer codes of a weight whose output channels are on axis 0."""
    lo, hi = weight_range(bits)
    return torch.clamp(rounding(w / channel_view(scale, w)), lo, hi)


def weight_values(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantized weight: codes times their output channel's scale."""
    return codes * channel_view(scale, codes)


def fake_weight(w, scale, bits: int):
    return weight_values(weight_codes(w, scale, bits), scale)


def fake_weight_ste(w, scale, bits: int):
    """``fake_weight``, differentiable in the latent weight and the scale (LSQ)."""
    return weight_values(weight_codes(w, scale, bits, round_ste), scale)


def fit_weight(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scale, each channel's clipping ratio chosen by MSE.

    ``importance`` (one weight per input column, e.g. the mean squared input activation) turns the
    weight MSE into an estimate of the layer's output error, which is what accuracy depends on.
    """
    rows = w.detach().reshape(w.shape[0], -1).float()
    absmax = rows.abs().amax(1).clamp(min=1e-8)
    qmax = weight_range(bits)[1]
    col_weight = torch.ones(rows.shape[1], device=w.device) if importance is None else importance.float()
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for alpha in alphas(40, 0.25):
        scale = absmax * alpha / qmax
        err = (((fake_weight(rows, scale, bits) - rows) ** 2) * col_weight).mean(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return float16_values(best)


def float16_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float16 values: the file stores them in half the bytes, exactly. A scale below
    float16's smallest (an all-zero channel: TinyViT's MBConv ends in a BatchNorm initialized to
    0) becomes that smallest, not 0, which would divide by zero."""
    return scale.clamp(min=2.0**-24).half().float()
