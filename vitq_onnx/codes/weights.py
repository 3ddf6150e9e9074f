"""Weight codes: symmetric per-output-channel clamp(round(w/scale), -2^(b-1), 2^(b-1)-1)."""

from __future__ import annotations

import numpy as np


def weight_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_codes(w: np.ndarray, scale: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int8 codes of a float32 weight whose output channels are on ``axis``, one scale each (the
    same IEEE division and round-half-to-even as calibration's torch ``weight_codes``)."""
    shape = [1] * w.ndim
    shape[axis] = -1
    lo, hi = weight_range(bits)
    return np.clip(np.round(w / scale.astype(np.float32).reshape(shape)), lo, hi).astype(np.int8)
