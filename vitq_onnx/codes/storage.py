"""Float parameters stored in fewer bytes: the values the file holds, for the passes and the simulation.

"float16": rounded to float16 values; "int8" (embedding tables): symmetric codes per last-axis
channel, dequantized when the session loads.
"""

from __future__ import annotations

import numpy as np


def int8_channel_scale(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per last-axis channel (1 for an all-zero channel), float32."""
    s = np.abs(x.reshape(-1, x.shape[-1])).max(0) / np.float32(127.0)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def int8_codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.round(x / scale).astype(np.int8)


def stored_values(x: np.ndarray, storage: str) -> np.ndarray:
    """The float32 values a parameter has once stored as ``storage``."""
    if storage == "float16":
        return x.astype(np.float16).astype(np.float32)
    scale = int8_channel_scale(x)
    return (np.round(x / scale) * scale).astype(np.float32)
