"""Quantizer numerics in torch: fake quantization and the search for their parameters.

These functions define what every quantized tensor means; the ONNX passes reproduce the same
integer grids with QuantizeLinear/DequantizeLinear and shift ops, so the simulation built from
them is the reference the exported model is checked against.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 2**16  # values used to score candidate ranges: a stable MSE at a small cost
LOG2_MAX_LEVELS = 16  # 4-bit codes at most: the shifted integers 2^7..1 fit uint8 kernels
SQRT2 = torch.tensor(math.sqrt(2.0), dtype=torch.float32)


def _sample(x: torch.Tensor, n: int = SAMPLE) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    if flat.numel() <= n:
        return flat
    gen = torch.Generator().manual_seed(0)
    return flat[torch.randint(0, flat.numel(), (n,), generator=gen)]


def _alphas(count: int, floor: float) -> torch.Tensor:
    """Clipping ratios from 1 down to ``floor``, geometrically spaced."""
    return torch.logspace(0, math.log10(floor), count)


# ---------------------------------------------------------------- uniform (activations)

def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Asymmetric unsigned grid covering [lo, hi] (which always contains 0)."""
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale.float(), zero_point.float()


def fake_uniform(x, scale, zero_point, bits: int):
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def _uniform_mse(x, lo, hi, bits, dims):
    scale, zp = uniform_params(lo, hi, bits)
    return ((fake_uniform(x, scale, zp, bits) - x) ** 2).mean(dims)


def fit_uniform(x: torch.Tensor, bits: int, unsigned: bool = False):
    """Per-tensor range by MSE: a joint clipping sweep, then the upper and lower ends in turn."""
    s = _sample(x)
    lo0 = torch.zeros(()) if unsigned else s.min().clamp(max=0).minimum(x.min())
    hi0 = x.max().clamp(min=0)
    a = _alphas(40, 0.05)
    col = s[None, :]
    best = _uniform_mse(col, (lo0 * a)[:, None], (hi0 * a)[:, None], bits, 1).argmin()
    lo, hi = lo0 * a[best], hi0 * a[best]
    for _ in range(2):
        hi = hi0 * a[_uniform_mse(col, lo.expand(len(a))[:, None], (hi0 * a)[:, None], bits, 1).argmin()]
        lo = lo0 * a[_uniform_mse(col, (lo0 * a)[:, None], hi.expand(len(a))[:, None], bits, 1).argmin()]
    return uniform_params(lo, hi, bits)


def fit_uniform_per_channel(x: torch.Tensor, bits: int, max_rows: int = 2048):
    """Per-channel (last axis) ranges by MSE, each channel choosing its own clipping."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    lo0, hi0 = rows.min(0).values, rows.max(0).values
    if rows.shape[0] > max_rows:
        gen = torch.Generator().manual_seed(0)
        rows = rows[torch.randint(0, rows.shape[0], (max_rows,), generator=gen)]
    a = _alphas(40, 0.05)

    def sweep(lo_of, hi_of):
        errs = torch.stack([_uniform_mse(rows, lo_of(k), hi_of(k), bits, 0) for k in range(len(a))])
        return a[errs.argmin(0)]

    best = sweep(lambda k: lo0 * a[k], lambda k: hi0 * a[k])
    lo, hi = lo0 * best, hi0 * best
    hi = hi0 * sweep(lambda k: lo, lambda k: hi0 * a[k])
    lo = lo0 * sweep(lambda k: lo0 * a[k], lambda k: hi)
    return uniform_params(lo, hi, bits)


# ---------------------------------------------------------------- symmetric (weights)

def weight_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of a weight whose output channels are on axis 0."""
    lo, hi = weight_range(bits)
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), lo, hi)


def fake_weight(w, scale, bits: int):
    return weight_codes(w, scale, bits) * scale.reshape(-1, *([1] * (w.dim() - 1)))


def fit_weight(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scale, each channel's clipping ratio chosen by MSE.

    ``importance`` (one weight per input column, e.g. the mean squared input activation) turns the
    weight MSE into an estimate of the layer's output error, which is what accuracy depends on.
    """
    rows = w.detach().reshape(w.shape[0], -1).float()
    absmax = rows.abs().amax(1).clamp(min=1e-8)
    qmax = weight_range(bits)[1]
    col_weight = torch.ones(rows.shape[1]) if importance is None else importance.float()
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for alpha in _alphas(40, 0.25):
        scale = absmax * alpha / qmax
        err = (((fake_weight(rows, scale, bits) - rows) ** 2) * col_weight).mean(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best.half().float()  # float16 values: the file stores them in half the bytes, exactly


# ---------------------------------------------------------------- log2 (post-Softmax)

def log2_zero_code(bits: int) -> int:
    """Codes 0..Z-1 are values scale*2^(-code/2); the top code Z means exactly zero."""
    return min(2**bits, LOG2_MAX_LEVELS) - 1


def log2_max_exponent(bits: int) -> int:
    return log2_zero_code(bits) // 2  # ceil((Z-1)/2): the largest shift of a non-zero code


LOG2_STEP = torch.tensor(math.log(2.0) / 2.0, dtype=torch.float32)  # one code = ln(sqrt(2))


def log2_log_scale(scale) -> torch.Tensor:
    """ln(scale) rounded once to float32: the constant the graph subtracts from ln(x)."""
    return torch.tensor(math.log(float(scale)), dtype=torch.float32)


def log2_codes_of_log(log_x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """log-sqrt(2) codes round((ln(scale) - ln(x)) / ln(sqrt(2))) in float32, clamped to [0, Z].

    The graph computes LogSoftmax, Sub, then a QuantizeLinear by ln(sqrt(2)) (round half to even,
    saturating to uint8) and a Min with Z; the simulation feeds onnxruntime's LogSoftmax here so
    both round the same values.
    """
    codes = torch.round((log2_log_scale(scale) - log_x.float()) / LOG2_STEP)
    return torch.clamp(codes, 0, log2_zero_code(bits))


def log2_codes(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    return log2_codes_of_log(torch.log(x.float()), scale, bits)


def log2_parts(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (shifted, odd): shifted = 2^E >> ceil(q/2), odd = shifted where q is odd, else 0.

    Code q stands for scale * 2^(-q/2) = unit * (shifted + (sqrt(2) - 1) * odd), unit = scale * 2^-E:
    the log-sqrt(2) quantizer reparameterized to base 2, so the integers are plain shifts and the
    irrational factor sits in one float constant. The zero code Z shifts 2^E right by more than E
    bits, which gives exactly 0.
    """
    q = codes.to(torch.int64)
    half_up = (q + 1) >> 1
    shifted = torch.bitwise_right_shift(torch.full_like(q, 2 ** log2_max_exponent(bits)), half_up)
    return shifted, shifted * (2 * half_up - q)


def log2_unit(scale, bits: int):
    """The value of integer 1 in ``log2_parts``: scale * 2^-E."""
    return scale * 2.0 ** (-log2_max_exponent(bits))


def log2_dequant(codes: torch.Tensor, scale, bits: int) -> torch.Tensor:
    shifted, odd = log2_parts(codes, bits)
    unit = log2_unit(scale, bits)
    return shifted.float() * unit + odd.float() * (unit * (SQRT2 - 1))


def fake_log2(x, scale, bits: int):
    return log2_dequant(log2_codes(x, scale, bits), scale, bits)


def fit_log2(x: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> torch.Tensor:
    """Scale for the log2 quantizer: the maximum, or up to two octaves below it.

    With ``v`` (the values the probabilities multiply) the score is the error of ``x @ v``, what
    attention actually outputs; small probabilities matter there in bulk, not one by one.
    """
    top = x.max().clamp(min=1e-8)
    candidates = top * 2.0 ** (-torch.arange(32) / 16.0)
    if v is None:
        s = _sample(x)
        errs = [((fake_log2(s, c, bits) - s) ** 2).mean() for c in candidates]
    else:
        n = min(len(x), 4)
        ref = x[:n] @ v[:n]
        errs = [((fake_log2(x[:n], c, bits) @ v[:n] - ref) ** 2).mean() for c in candidates]
    return candidates[torch.stack(errs).argmin()].reshape(())
