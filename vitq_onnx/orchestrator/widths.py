"""Choose the bit map: uniform ``--bits`` with ``--layer-bits`` rules, or greedy mixed precision
(``--avg-bits``, ``--max-drop``) measured for the method (``calibration/mixed_precision.py``)."""

from __future__ import annotations

from ..calibration.bits import BitWidths
from ..calibration.mixed_precision import choose_widths, widths_for_drop
from ..progress import StageTimes
from .inputs import Inputs


def choose(inputs: Inputs, opts, times: StageTimes, say) -> tuple[BitWidths, dict | None]:
    """The bit widths to calibrate with, and what the recipe records of a mixed-precision choice."""
    bits = inputs.bits
    if inputs.given is not None or (opts.avg_bits is None and opts.max_drop is None):
        return bits, None
    with times("mixed precision"):
        if opts.avg_bits is not None:
            return choose_widths(inputs.model, inputs.images, bits, opts.avg_bits, inputs.name, say, opts.progress,
                                 inputs.method)
        return widths_for_drop(inputs.model, inputs.images, inputs.held, bits, opts.max_drop, inputs.name, say,
                               opts.progress, inputs.method)
