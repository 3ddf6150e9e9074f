"""The log2-table kind's integer levels, shared by calibration and ``passes/log2_table_softmax.py``.

Code k stands for scale * L_k / 2^14 with L_k = round(exp((14 - k/m) ln 2 + offset)), about
2^14 * 2^(-k/m); the offset (0 or a few 2^-12 below) keeps every level far from a rounding tie,
so the graph's Exp rounds to the same integers on any CPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..errors import VitqError
from .spec import KindSpec, register_spec, scalar

GRID_BITS = 14  # levels are integers L_k <= 2^14 in units of scale * 2^-14
DIGIT_BITS = 7  # qdq: L_k = 128 * high + low, two digits of at most 128
PER_OCTAVE = (1, 2, 4, 8)  # the level spacings the fit chooses from
# every level's exp(argument) lies this many float32 ulps or more from a rounding tie, so any Exp
# kernel within that error (onnxruntime's on AVX2, AVX-512 or Arm: a few ulps) rounds it alike
SAFE_ULPS = 64
OFFSET_STEP = 2.0**-12  # the search step of the argument offset that moves levels off ties
FLOAT_EXACT = 2**24  # float32 GEMM sums of integers are exact below this
V_MAX = 2**7  # the largest |code| of v, an 8-bit quantizer


def table_step(per_octave: int) -> np.float32:
    """ln(2)/m rounded once to float32: one code in the log domain, the graph's quantization step."""
    return np.float32(math.log(2.0) / per_octave)


def level_arguments(bits: int, per_octave: int, offset) -> np.ndarray:
    """ln of each code's level in float32, as the graph computes it: DequantizeLinear of the code
    with scale ln(2)/m and zero point 14 m, subtracted from ``offset``."""
    k = np.arange(2**bits, dtype=np.float32)
    return np.float32(offset) - (k - np.float32(GRID_BITS * per_octave)) * table_step(per_octave)


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


def table_levels(bits: int, per_octave: int) -> np.ndarray:
    """L_k = round(exp(argument_k)) for every code k (int64), about 2^14 * 2^(-k/m)."""
    values = np.exp(level_arguments(bits, per_octave, level_offset(bits, per_octave)).astype(np.float64))
    return np.round(values).astype(np.int64)


def spacings(bits: int) -> tuple[int, ...]:
    """The spacings whose top code's level is 0, so small probabilities can still become zero
    (with few codes none may reach it: then every spacing)."""
    return tuple(m for m in PER_OCTAVE if table_levels(bits, m)[-1] == 0) or PER_OCTAVE


def table_digits(bits: int, per_octave: int) -> list[np.ndarray]:
    """[high, low] 7-bit digits of each code's L_k (int64 tables, 2^b entries each)."""
    levels = table_levels(bits, per_octave)
    return [levels >> DIGIT_BITS, levels & (2**DIGIT_BITS - 1)]


def table_unit(scale, s_v) -> np.float32:
    """The float value of integer 1 in the sum of L times v's codes: scale * s_v * 2^-14, float32."""
    return np.float32(float(scale) * float(s_v) * 2.0**-GRID_BITS)


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


@register_spec
class Log2TableSpec(KindSpec):
    name = "log2-table"
    params = ("scale", "per_octave")

    def check(self, key, bits, params):
        super().check(key, bits, params)
        if not scalar(params["scale"]) > 0 or scalar(params["per_octave"]) not in spacings(bits):
            raise VitqError(f"{key}: log2-table scale must be > 0 and per_octave one of {spacings(bits)} at {bits} bits")
