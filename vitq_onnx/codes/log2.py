"""RepQ-ViT's log-sqrt(2) codes as integers, shared by calibration and ``passes/log2_softmax.py``.

Codes 0..Z-1 stand for scale * 2^(-code/2) and the top code Z for exactly zero. Reparameterized
to base 2, code q is unit * (shifted + (sqrt(2) - 1) * odd) with shifted = 2^E >> ceil(q/2), odd =
shifted when q is odd, and unit = scale * 2^-E: plain integer shifts and one float constant.
"""

from __future__ import annotations

import math

import numpy as np

from .spec import KindSpec, register_spec

LOG2_MAX_LEVELS = 16  # 4-bit codes at most: the shifted integers 2^7..1 fit uint8 kernels
SQRT2 = np.float32(math.sqrt(2.0))
LOG2_STEP = np.float32(math.log(2.0) / 2.0)  # one code = ln(sqrt(2)), rounded once to float32


def log2_zero_code(bits: int) -> int:
    """Codes 0..Z-1 are values scale*2^(-code/2); the top code Z means exactly zero."""
    return min(2**bits, LOG2_MAX_LEVELS) - 1


def log2_max_exponent(bits: int) -> int:
    return log2_zero_code(bits) // 2  # ceil((Z-1)/2): the largest shift of a non-zero code


def log2_log_scale(scale) -> np.float32:
    """ln(scale) rounded once to float32: the constant the graph subtracts from ln(x)."""
    return np.float32(math.log(float(scale)))


def log2_unit(scale, bits: int):
    """The value of integer 1 in the shifted parts: scale * 2^-E (exact: a power of two)."""
    return scale * 2.0 ** (-log2_max_exponent(bits))


@register_spec
class Log2Spec(KindSpec):
    name = "log2"
    params = ("scale",)
