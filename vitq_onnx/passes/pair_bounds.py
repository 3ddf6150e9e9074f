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

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from ..errors import VitqError
from .base import Pass, PassContext
from .hoist_quantize import MOVES

INT16_MAX = 2**15 - 1
_CODE_MOVES = (*MOVES, "Split")  # a code tensor's values come from its input's
# input positions of (a, b, a zero point, b zero point)
_OPERANDS = {"MatMulInteger": (0, 1, 2, 3), "MatMulIntegerToFloat": (0, 1, 4, 5), "ConvInteger": (0, 1, 2, 3)}
_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
           np.dtype(ml_dtypes.uint4): (0, 15), np.dtype(ml_dtypes.int4): (-8, 7)}


def code_range(tensor: gs.Tensor, dtype: np.dtype) -> tuple[int, int]:
    """The smallest and largest code ``tensor`` (of integer type ``dtype``) can hold."""
    lo, hi = _RANGES[np.dtype(dtype)]
    if isinstance(tensor, gs.Constant):
        return int(tensor.values.min()), int(tensor.values.max())
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Cast" and _dtype_of(producer.inputs[0]) in _RANGES:
        a, b = code_range(producer.inputs[0], _dtype_of(producer.inputs[0]))  # e.g. 4-bit codes widened
        return max(lo, a), min(hi, b)
    if producer is not None and producer.op in _CODE_MOVES:
        return code_range(producer.inputs[0], dtype)
    if producer is not None and producer.op == "Gather" and isinstance(producer.inputs[0], gs.Constant):
        table = producer.inputs[0].values  # a lookup table's entries (post-Softmax digits)
        return max(lo, int(table.min())), min(hi, int(table.max()))
    if producer is not None and producer.op == "QuantizeLinear":
        x, scale, zero = producer.inputs[:3]
        clip = x.inputs[0] if x.inputs else None
        if clip is not None and clip.op == "Clip" and all(isinstance(t, gs.Constant) for t in clip.inputs[1:3]) \
                and scale.values.size == 1:
            s, z = float(scale.values), int(zero.values)
            a, b = (int(np.rint(float(t.values) / s)) + z for t in clip.inputs[1:3])
            return max(lo, a), min(hi, b)
    return lo, hi


def _dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    if tensor.dtype is not None:
        return np.dtype(tensor.dtype)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "QuantizeLinear":  # its type is its zero point's
        return np.dtype(producer.inputs[2].values.dtype)
    if producer is not None and producer.op in _CODE_MOVES:
        return _dtype_of(producer.inputs[0])
    return None


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
