"""Post-condition: no u8*s8 product pair can saturate on a CPU without VNNI (``--target-cpu portable``).

onnxruntime's AVX2 u8*s8 GEMM (vpmaddubsw) adds two adjacent products a1*b1 + a2*b2 of the raw codes
in int16, saturating past 32767; VNNI, AMX and u8*u8 kernels accumulate in int32. This pass finds
every integer GEMM (MatMulInteger, MatMulIntegerToFloat, ConvInteger) with a uint8 and an int8
operand, bounds each operand's codes from the graph itself (a constant's values; a Gather's table;
a Clip's bounds before a QuantizeLinear; through ops that only move codes; else the container's
range) and checks 2 * max|a| * max|b| <= 32767.
A ``portable`` model that fails is not written; a ``vnni`` model is only measured.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import VitqError
from .base import Pass, PassContext
from .common import code_range

INT16_MAX = 2**15 - 1
# input positions of (a, b, a zero point, b zero point)
_OPERANDS = {"MatMulInteger": (0, 1, 2, 3), "MatMulIntegerToFloat": (0, 1, 4, 5), "ConvInteger": (0, 1, 2, 3)}


def pair_bounds(graph: gs.Graph) -> dict[str, int]:
    """Largest |a1*b1 + a2*b2| of each u8*s8 integer GEMM, by node name."""
    bounds = {}
    for node in graph.nodes:
        if node.op not in _OPERANDS:
            continue
        ia, ib, iza, izb = _OPERANDS[node.op]
        ta, tb = np.dtype(node.inputs[iza].values.dtype), np.dtype(node.inputs[izb].values.dtype)
        if (ta, tb) != (np.dtype(np.uint8), np.dtype(np.int8)):
            continue
        a, b = code_range(node.inputs[ia], ta), code_range(node.inputs[ib], tb)
        bounds[node.name] = 2 * max(abs(a[0]), abs(a[1])) * max(abs(b[0]), abs(b[1]))
    return bounds


class CheckPairBounds(Pass):
    name = "check_pair_bounds"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        bounds = pair_bounds(graph)
        ctx.notes["max_pair_sum"] = max(bounds.values(), default=0)
        worst = max(bounds, key=bounds.get, default=None)
        if ctx.target_cpu == "portable" and worst is not None and bounds[worst] > INT16_MAX:
            raise VitqError(f"{worst}: u8*s8 product pairs reach {bounds[worst]} > {INT16_MAX}, which saturates "
                            "on CPUs without VNNI (a bug in the passes: portable models must never do this)")
