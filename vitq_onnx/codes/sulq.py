"""I&S-ViT's SULQ codes as integer shifts, shared by calibration and ``passes/sulq_softmax.py``.

Code k stands for 2^e_k - eta, e_k = round(lo + k * delta). With eta = 2^-j every level is
eta * (2^i - 1), i = e_k + j in 0..15, and 2^i splits into uint8 parts weighted 256^p, each
2^7 >> s for a per-code shift s (8: not in this part).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import VitqError
from .spec import KindSpec, register_spec, scalar

SULQ_MAX_SHIFT = 15  # eta >= 2^-15 deploys: 2^i <= 2^15 splits into two uint8 parts
PART_BITS = 8
LN2 = math.log(2.0)


def eta_shift(eta: float) -> int | None:
    """j with eta = 2^-j (0 <= j <= 15), or None when eta is not such a power of two."""
    j = -math.log2(eta) if eta > 0 else math.inf
    return int(j) if j == int(j) and 0 <= j <= SULQ_MAX_SHIFT else None


def graph_constants(lo, delta) -> tuple[np.float32, np.float32]:
    """(lo * ln 2, delta * ln 2) as float32: the graph quantizes ln(x + eta) with them."""
    return np.float32(float(lo) * LN2), np.float32(float(delta) * LN2)


def sulq_exponents(lo, delta, bits: int) -> np.ndarray:
    """e_k = round(lo + k * delta) for every code k (computed in float64, int64)."""
    k = np.arange(2**bits, dtype=np.float64)
    return np.round(float(lo) + k * float(delta)).astype(np.int64)


def sulq_part_shifts(lo, delta, eta, bits: int) -> list[np.ndarray]:
    """Per uint8 part p, each code's right shift of 2^7: 2^7 >> s is 2^(i - 8p) when i falls in
    the part, and 0 (shift 8) when not; the parts weighted 256^p sum to 2^i exactly."""
    j = eta_shift(float(eta))
    if j is None:
        raise VitqError(f"SULQ eta {float(eta):g} is not 2^-j (j = 0..{SULQ_MAX_SHIFT}): it cannot be deployed")
    i = sulq_exponents(lo, delta, bits) + j
    if i.min() < 0 or i.max() > SULQ_MAX_SHIFT:
        raise VitqError(f"SULQ levels 2^i - 1 need 0 <= i <= {SULQ_MAX_SHIFT}, got {int(i.min())}..{int(i.max())}")
    parts = int(i.max()) // PART_BITS + 1
    top = PART_BITS - 1
    return [np.where((i >= PART_BITS * p) & (i < PART_BITS * (p + 1)), top - (i - PART_BITS * p),
                     np.full_like(i, PART_BITS)) for p in range(parts)]


def part_unit(eta, s_v, part: int) -> np.float32:
    """The float value of integer 1 in part ``part``: eta * s_v * 256^part, rounded to float32."""
    return np.float32(float(eta) * float(s_v) * 2.0 ** (PART_BITS * part))


class _SULQSpec(KindSpec):
    params = ("eta", "lo", "delta")

    def check(self, key, bits, params):
        super().check(key, bits, params)
        if not (scalar(params["eta"]) > 0 and scalar(params["delta"]) > 0):
            raise VitqError(f"{key}: SULQ eta and delta must be > 0")


@register_spec
class SULQSpec(_SULQSpec):
    """eta = 2^-j: deployed with integer shifts."""

    name = "sulq"

    def check(self, key, bits, params):
        super().check(key, bits, params)
        sulq_part_shifts(params["lo"], params["delta"], params["eta"], bits)  # deployable


@register_spec
class SULQFreeSpec(_SULQSpec):
    """The paper's free eta grid: simulation only."""

    name = "sulq-free"
    deployable = False
    why_not_deployable = "sulq-free (eta not a power of two) is for simulation only: use sulq to export"
