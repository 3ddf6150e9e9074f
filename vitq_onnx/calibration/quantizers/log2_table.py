"""Post-Softmax log quantizer with every code used: m levels per octave on an integer grid.

Why: RepQ-ViT's log-sqrt(2) quantizer (``log2.py``) deploys as shifts of uint8 integers, so it
keeps at most 16 levels whatever the width, and at 6 bits its sqrt(2) step near 1 is the model's
largest error (``vitq-onnx report`` on an ``ias`` W6/A6 DeiT-Ti: 6-10 dB on the middle blocks'
attention maps, above 21 dB on every other tensor). Here all 2^b codes count: code k stands for
scale * L_k / 2^14 with the integer L_k = round(exp((14 - k/m) ln 2 + offset)), about 2^14 *
2^(-k/m), and the top code's level is 0; the fit chooses the spacing m (levels per octave: as
AdaLog adapts its log base) with the scale, by the error of the attention output. The offset
(0 or a few 2^-12 below) keeps every level far from a rounding tie, so the graph's Exp rounds
to the same integers on any CPU.

Deployment (``passes/log2_table_softmax.py``): codes from LogSoftmax as log2's are (a
QuantizeLinear by ln(2)/m); ``ort`` makes L_k with DequantizeLinear, Add, Exp and Round and
multiplies it with v's codes in a float32 GEMM, exact because the fit keeps the scale high
enough that no row's sum reaches 2^24; ``qdq`` (and ``ort`` where v's codes are wider than that
allows) reads L_k's two 7-bit digits from 2^b-entry tables (Gather) into two integer GEMMs
added in int32. One float unit after either.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ... import runtime_kernels
from ...errors import VitqError
from . import QuantizerKind, exact_sum_matmul, get_kind, register, round_ste, torch_params
from .log2 import log2_log_scale, log_codes_of_log
from .search import attention_sample

GRID_BITS = 14  # levels are integers L_k <= 2^14 in units of scale * 2^-14
DIGIT_BITS = 7  # qdq: L_k = 128 * high + low, two digits of at most 128
PER_OCTAVE = (1, 2, 4, 8)  # the level spacings the fit chooses from
# every level's exp(argument) lies this many float32 ulps or more from a rounding tie, so any Exp
# kernel within that error (onnxruntime's on AVX2, AVX-512 or Arm: a few ulps) rounds it alike
SAFE_ULPS = 64
OFFSET_STEP = 2.0**-12  # the search step of the argument offset that moves levels off ties
FLOAT_EXACT = 2**24  # float32 GEMM sums of integers are exact below this
V_MAX = 2**7  # the largest |code| of v, an 8-bit quantizer


def level_arguments(bits: int, per_octave: int, offset) -> np.ndarray:
    """ln of each code's level in float32, as the graph computes it: DequantizeLinear of the code
    with scale ln(2)/m and zero point 14 m, subtracted from ``offset``."""
    k = np.arange(2**bits, dtype=np.float32)
    return np.float32(offset) - (k - np.float32(GRID_BITS * per_octave)) * table_step(per_octave).numpy()


def _safe(values: np.ndarray) -> bool:
    ulp = np.spacing(values.astype(np.float32)).astype(np.float64)
    return bool((np.abs(values - np.floor(values) - 0.5) >= SAFE_ULPS * ulp).all())


@lru_cache(maxsize=None)
def level_offset(bits: int, per_octave: int) -> np.float32:
    """The first offset 0, -2^-12, -2^-11, ... at which no level sits near a rounding tie."""
    for i in range(256):
        offset = np.float32(-i * OFFSET_STEP)
        if _safe(np.exp(level_arguments(bits, per_octave, offset).astype(np.float64))):
            return offset
    raise VitqError(f"no log2-table offset keeps {bits}-bit levels with spacing {per_octave} off rounding ties")


def table_levels(bits: int, per_octave: int) -> torch.Tensor:
    """L_k = round(exp(argument_k)) for every code k (int64), about 2^14 * 2^(-k/m)."""
    values = np.exp(level_arguments(bits, per_octave, level_offset(bits, per_octave)).astype(np.float64))
    return torch.from_numpy(np.round(values).astype(np.int64))


def spacings(bits: int) -> tuple[int, ...]:
    """The spacings whose top code's level is 0, so small probabilities can still become zero
    (with few codes none may reach it: then every spacing)."""
    return tuple(m for m in PER_OCTAVE if table_levels(bits, m)[-1] == 0) or PER_OCTAVE


def table_digits(bits: int, per_octave: int) -> list[torch.Tensor]:
    """[high, low] 7-bit digits of each code's L_k (int64 tables, 2^b entries each)."""
    levels = table_levels(bits, per_octave)
    return [levels >> DIGIT_BITS, levels & (2**DIGIT_BITS - 1)]


def table_step(per_octave: int) -> torch.Tensor:
    """ln(2)/m rounded once to float32: one code in the log domain, the graph's quantization step."""
    return torch.tensor(math.log(2.0) / per_octave, dtype=torch.float32)


def table_codes_of_log(log_x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    return log_codes_of_log(log_x, log2_log_scale(scale), table_step(per_octave), 2**bits - 1)


def table_unit(scale, s_v) -> torch.Tensor:
    """The float value of integer 1 in the sum of L times v's codes: scale * s_v * 2^-14, float32."""
    return torch.tensor(np.float32(float(scale) * float(s_v) * 2.0**-GRID_BITS))


def row_sum_bound(scale, per_octave: int, v_max: int) -> float:
    """The largest |sum of L * v| over a softmax row, whatever its length, when the top code's level
    is 0: the row sums to 1, code k's level before rounding is at most 2^14 * 2^(1/2m) * p / scale,
    and rounding at most doubles a level that is not 0. Below 2^24 a float32 GEMM sums it exactly
    in any order."""
    return 2.0 * 2.0**GRID_BITS * 2.0 ** (1 / (2 * per_octave)) * 1.001 * v_max / float(scale)


def smallest_scale(per_octave: int) -> float:
    """The least scale whose rows stay below 2^24 with any v of 8 signed bits (the fit keeps to it,
    so the ``ort`` graph can take its fast float GEMM)."""
    return row_sum_bound(1.0, per_octave, V_MAX) / FLOAT_EXACT


def fake_table(x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    levels = table_levels(bits, per_octave).to(x.device).float() * (2.0**-GRID_BITS) * float(scale)
    return levels[table_codes_of_log(torch.log(x.float()), scale, bits, per_octave).long()]


def fit_table(x: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Spacing and scale (the maximum or up to two octaves below it, never below
    ``smallest_scale``) with the least error of ``x @ v`` (attention's output), or of ``x`` itself
    without ``v``."""
    top = float(x.max().clamp(min=1e-8))
    xs, vs = attention_sample(x, v)
    ref = xs if v is None else xs @ vs
    best, best_err = None, math.inf
    for m in spacings(bits):
        for i in range(32):
            scale = max(top * 2.0 ** (-i / 16.0), smallest_scale(m))
            xq = fake_table(xs, scale, bits, m)
            err = float((((xq if v is None else xq @ vs) - ref) ** 2).mean())
            if err < best_err:
                best, best_err = (scale, m), err
    return {"scale": torch.tensor(best[0], dtype=torch.float32), "per_octave": torch.tensor(float(best[1]))}


@register
class Log2Table(QuantizerKind):
    name = "log2-table"
    params = ("scale", "per_octave")
    learnable = ("scale",)
    sim_softmax = staticmethod(runtime_kernels.log_softmax)  # the graph quantizes LogSoftmax's output

    def fit(self, x, bits, point):
        return fit_table(x, bits, point.partner)

    def fake(self, x, params, bits):
        return fake_table(x, params["scale"], bits, int(params["per_octave"]))

    def fake_ste(self, x, params, bits):
        scale, m = params["scale"], int(params["per_octave"])
        log_x = torch.log(x.clamp(min=torch.finfo(x.dtype).tiny))  # exact zeros take the zero code
        codes = torch.clamp(round_ste((torch.log(scale) - log_x) / table_step(m).to(x.device)), 0, 2**bits - 1)
        smooth = torch.where(codes < 2**bits - 1, scale * torch.exp2(-codes / m), torch.zeros_like(x))
        exact = table_levels(bits, m).to(x.device).float()[codes.detach().long()] * (2.0**-GRID_BITS) * scale
        return smooth + (exact - smooth).detach()  # the deployed values, the gradient of 2^(-k/m)

    def exact_matmul(self, qa, qb):
        """The exact sum of each code's level L times v's codes, float32 of it times one unit: the
        ``ort`` graph's float GEMM (exact below 2^24) and ``qdq``'s two integer GEMMs of L's digits
        added in int32 both compute it."""
        p, kind_b, params_b = torch_params(qa), get_kind(qb.kind), torch_params(qb)
        m = int(p["per_octave"])
        levels, unit = table_levels(qa.bits, m), table_unit(p["scale"], kind_b.step(params_b))

        def table_matmul(log_a, b):
            codes = table_codes_of_log(log_a, p["scale"], qa.bits, m).long()
            return exact_sum_matmul(levels.to(codes.device)[codes].float(), kind_b.codes(b, params_b, qb.bits)) * unit

        return table_matmul

    def check(self, key, bits, params):
        super().check(key, bits, params)
        if not float(np.asarray(params["scale"])) > 0 or float(np.asarray(params["per_octave"])) not in spacings(bits):
            raise VitqError(f"{key}: log2-table scale must be > 0 and per_octave one of {spacings(bits)} at {bits} bits")

    def deploy_passes(self, keys):
        from ...passes.log2_table_softmax import Log2TableSoftmax
        return [Log2TableSoftmax(keys)]
