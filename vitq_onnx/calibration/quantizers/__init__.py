"""Quantizer kinds' calibration behaviour, one module each, registered by name (``kind.py``).

Importing this package registers every kind.
"""

from .kind import (  # noqa: F401
    KINDS,
    QuantizerKind,
    exact_sum_matmul,
    fake,
    get_kind,
    integer_matmul,
    kind_for,
    register,
    round_ste,
    torch_params,
)
from . import uniform, log2, sulq, log2_table  # noqa: E402,F401  (registers the kinds, in this order)
