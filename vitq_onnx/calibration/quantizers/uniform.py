"""Uniform affine quantizer: codes clamp(round(x/scale) + zero_point, 0, 2^bits - 1).

Per tensor in the deployed model (QuantizeLinear/DequantizeLinear, ``passes/insert_qdq.py``);
per last-axis channel only during calibration, before RepQ-ViT's reparameterization folds it.
"""

from __future__ import annotations

import numpy as np
import torch

from .kind import QuantizerKind, register, round_ste
from .search import alphas, sample


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Asymmetric unsigned grid covering [lo, hi] (which always contains 0)."""
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale.float(), zero_point.float()


def fake_uniform(x, scale, zero_point, bits: int, rounding=torch.round):
    if rounding is torch.round and not any(getattr(t, "requires_grad", False) for t in (x, scale, zero_point)):
        # the same operations in place on one new tensor: the same values at a third of the time
        # on attention maps of millions of entries
        return (x / scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
    q = torch.clamp(rounding(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def _uniform_mse(x, lo, hi, bits, dims):
    scale, zp = uniform_params(lo, hi, bits)
    return ((fake_uniform(x, scale, zp, bits) - x) ** 2).mean(dims)


def fit_uniform(x: torch.Tensor, bits: int, unsigned: bool = False):
    """Per-tensor range by MSE: a joint clipping sweep, then the upper and lower ends in turn."""
    s = sample(x).cpu()
    lo0 = torch.zeros(()) if unsigned else s.min().clamp(max=0).minimum(x.min().cpu())
    hi0 = x.max().cpu().clamp(min=0)
    a = alphas(40, 0.05)
    col = s[None, :]
    best = _uniform_mse(col, (lo0 * a)[:, None], (hi0 * a)[:, None], bits, 1).argmin()
    lo, hi = lo0 * a[best], hi0 * a[best]
    for _ in range(2):
        hi = hi0 * a[_uniform_mse(col, lo.expand(len(a))[:, None], (hi0 * a)[:, None], bits, 1).argmin()]
        lo = lo0 * a[_uniform_mse(col, (lo0 * a)[:, None], hi.expand(len(a))[:, None], bits, 1).argmin()]
    return uniform_params(lo, hi, bits)


def channel_stats(x: torch.Tensor, max_rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a per-channel fit needs of ``x`` (last axis channels): each channel's min and max, and
    a fixed random sample of at most ``max_rows`` rows; a few KB whatever the batch and tokens."""
    rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
    lo0, hi0 = rows.min(0).values, rows.max(0).values
    if rows.shape[0] > max_rows:
        gen = torch.Generator().manual_seed(0)
        rows = rows[torch.randint(0, rows.shape[0], (max_rows,), generator=gen)]
    return lo0, hi0, rows


def fit_uniform_per_channel(stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int):
    """Per-channel ranges by MSE on ``channel_stats``, each channel choosing its own clipping."""
    lo0, hi0, rows = stats
    a = alphas(40, 0.05)

    def sweep(lo_of, hi_of):
        errs = torch.stack([_uniform_mse(rows, lo_of(k), hi_of(k), bits, 0) for k in range(len(a))])
        return a[errs.argmin(0)]

    best = sweep(lambda k: lo0 * a[k], lambda k: hi0 * a[k])
    lo, hi = lo0 * best, hi0 * best
    hi = hi0 * sweep(lambda k: lo, lambda k: hi0 * a[k])
    lo = lo0 * sweep(lambda k: lo0 * a[k], lambda k: hi)
    return uniform_params(lo, hi, bits)


def fit_uniform_rows(x: torch.Tensor, bits: int, weight: torch.Tensor | None = None, span=None):
    """Per-tensor range of ``x`` (rows) by a joint clipping sweep, then each end in turn, scored by
    the error of x itself or, with ``weight``, of the Linear output x @ weight^T (MPTQ-ViT's OPT-m).
    ``span``: the tensor's (min, max) when ``x`` is a sample of its rows."""
    lo0, hi0 = span if span is not None else (x.min(), x.max())
    lo0, hi0 = torch.as_tensor(lo0).clamp(max=0), torch.as_tensor(hi0).clamp(min=0)
    a = alphas(40, 0.05)
    ref = x if weight is None else x @ weight.t()

    def err(lo, hi):
        scale, zp = uniform_params(lo, hi, bits)
        q = fake_uniform(x, scale, zp, bits)
        return float((((q if weight is None else q @ weight.t()) - ref) ** 2).mean())

    best = min(range(len(a)), key=lambda k: err(lo0 * a[k], hi0 * a[k]))
    lo, hi = lo0 * a[best], hi0 * a[best]
    for _ in range(2):
        hi = hi0 * a[min(range(len(a)), key=lambda k: err(lo, hi0 * a[k]))]
        lo = lo0 * a[min(range(len(a)), key=lambda k: err(lo0 * a[k], hi))]
    return uniform_params(lo, hi, bits)



@register
class Uniform(QuantizerKind):
    name = "uniform"
    learnable = ("scale",)  # LSQ: the gradient through straight-through rounding

    def fit(self, x, bits, point):
        scale, zero_point = fit_uniform(x, bits, unsigned=point.role == "softmax")
        return {"scale": scale, "zero_point": zero_point}

    def fake(self, x, params, bits):
        return fake_uniform(x, params["scale"], params["zero_point"], bits)

    def fake_ste(self, x, params, bits):
        return fake_uniform(x, params["scale"], params["zero_point"], bits, round_ste)

    def step(self, params):
        return params["scale"]

    def codes(self, x, params, bits):
        zp = params["zero_point"]  # the codes minus the zero point, without the round trip through fake
        return (x / params["scale"]).round_().add_(zp).clamp_(0, 2**bits - 1).sub_(zp)

    def to_numpy(self, params):
        out = super().to_numpy(params)
        out["zero_point"] = out["zero_point"].astype(np.int32)
        return out

