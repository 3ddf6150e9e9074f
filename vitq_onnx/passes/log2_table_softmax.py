"""Post-Softmax log2-table quantization in the graph: log-domain codes, integer levels, exact attn@v.

Codes as the log2 pass makes them (LogSoftmax, Sub, QuantizeLinear by ln(2)/m, Min with Z); code
k stands for scale * L_k / 2^14 (codes/log2_table.py). ``ort`` makes L_k with
fast float kernels (DequantizeLinear with scale ln(2)/m and zero point 14 m, subtracted from the
offset; Exp; Round: every level is far from a tie, so any Exp rounds alike) and multiplies it with
v's codes in a float32 MatMul, exact because no row sum reaches 2^24 (``row_sum_bound``, with
v's codes bounded from the graph as ``pair_bounds`` does, when the top code's level is 0).
onnxruntime's Gather, a table lookup, was 40 times slower per element than these kernels. The
portable ``qdq``, and ``ort`` where that bound fails, read L_k's 7-bit digits from two uint8
tables (Gather: what integer hardware does) into two integer GEMMs added in int32. Both give
float32(sum of L_k * v) times one float unit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..formats import format_spec
from ..codes.log2 import log2_log_scale
from ..codes.log2_table import (
    DIGIT_BITS,
    FLOAT_EXACT,
    GRID_BITS,
    level_offset,
    row_sum_bound,
    table_digits,
    table_levels,
    table_step,
    table_unit,
)
from .attention_av import PostSoftmaxPass, dequantized_v, log_codes, sum_parts
from .base import OpBuilder
from .common import code_range
from .deploy import deploys


def _rewrite(b: OpBuilder, node: gs.Node, softmax: gs.Node, aq, key: str, fmt: str) -> None:
    f32, u8, i32 = np.float32, np.uint8, np.int32
    scale, m = f32(aq.params["scale"].reshape(())), int(aq.params["per_octave"].reshape(()))
    codes = log_codes(b, softmax, log2_log_scale(scale), table_step(m), 2**aq.bits - 1,
                      "table_codes", "ln_step")
    v_codes, v_scale, v_zero = dequantized_v(b, node.inputs[1], key)
    unit = b.const("unit", table_unit(scale, v_scale), f32)
    lo, hi = code_range(v_codes, v_zero.values.dtype)
    v_max = max(abs(lo - int(v_zero.values)), abs(hi - int(v_zero.values)))
    if format_spec(fmt).ort_kernels and table_levels(aq.bits, m)[-1] == 0 and row_sum_bound(scale, m, v_max) < FLOAT_EXACT:
        steps = b.op("DequantizeLinear", "steps_below_grid", [codes, b.const("level_step", table_step(m), f32),
                                                               b.const("grid_code", GRID_BITS * m, u8)], dtype=f32)
        ln_level = b.op("Sub", "ln_level", [b.const("level_offset", level_offset(aq.bits, m), f32), steps], dtype=f32)
        level = b.op("Round", "level", [b.op("Exp", "level_exp", [ln_level], dtype=f32)], dtype=f32)
        v = b.op("DequantizeLinear", "v_codes_float", [v_codes, b.const("one", 1.0, f32), v_zero], dtype=f32)
        sums = b.op("MatMul", "level_sum", [level, v], dtype=f32)
    else:
        index = b.op("Cast", "code_index", [codes], dtype=np.int64, to=onnx.TensorProto.INT64)
        parts = []
        for name, digits in zip(("high", "low"), table_digits(aq.bits, m)):
            digit = b.op("Gather", f"level_{name}", [b.const(f"level_{name}_table", digits, u8), index],
                         dtype=u8, axis=0)
            parts.append(b.op("MatMulInteger", f"{name}_sum_int32", [digit, v_codes, b.const(f"{name}_zero", 0, u8),
                                                                      v_zero], dtype=i32))
        high = b.op("Mul", "high_sum_scaled", [parts[0], b.const("digit_base", 2**DIGIT_BITS, i32)], dtype=i32)
        sums = b.op("Cast", "level_sum", [b.op("Add", "level_sum_int32", [high, parts[1]], dtype=i32)], dtype=f32,
                    to=onnx.TensorProto.FLOAT)
    sum_parts(b, node, [b.op("Mul", "sum", [sums, unit], dtype=f32)])


@deploys("log2-table")
class Log2TableSoftmax(PostSoftmaxPass):
    """Deploys the recipe's log2-table quantizers at ``keys``."""

    name = "log2_table_softmax"
    kind = "log2-table"
    rewrite = staticmethod(_rewrite)
