"""RepQ-ViT post-Softmax quantization in the graph: log2 codes, shifts, integer attn@v.

Codes: the Softmax becomes a LogSoftmax, and q = min(QuantizeLinear(ln(scale) - ln(x),
ln(sqrt(2))), Z) as uint8 (Z, the top code, means zero). Dequantizing is a shift: code q stands
for unit * (shifted + (sqrt(2) - 1) * odd), shifted = 2^E >> ceil(q/2) and odd = shifted when q
is odd (codes/log2.py): the log-sqrt(2) quantizer reparameterized to base 2.
ceil(q/2) = round(0.5 q / (1 - 2^-8)), far from a rounding tie. The portable ``qdq`` format makes
2^(E-c) with a BitShift, as integer hardware does; onnxruntime's BitShift is slow, so the ``ort``
format makes it with fast float kernels, rounded back exactly: round(exp((E - c) ln 2) / (1 + 2^-9)).
Two integer GEMMs multiply them with v's codes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..formats import format_spec
from ..codes.log2 import LOG2_STEP, SQRT2, log2_log_scale, log2_max_exponent, log2_unit, log2_zero_code
from .attention_av import PostSoftmaxPass, dequantized_v, log_codes, scaled_integer_matmul, sum_parts
from .base import OpBuilder
from .deploy import deploys


def _rewrite(b: OpBuilder, node: gs.Node, softmax: gs.Node, aq, key: str, fmt: str) -> None:
    f32, u8 = np.float32, np.uint8
    scale, e_max = f32(aq.params["scale"].reshape(())), log2_max_exponent(aq.bits)
    q = log_codes(b, softmax, log2_log_scale(scale), LOG2_STEP, log2_zero_code(aq.bits),
                  "log2_codes", "ln_sqrt2")
    half = b.op("DequantizeLinear", "half_q", [q, b.const("half", 0.5, f32), b.const("half_zero", 0, u8)], dtype=f32)
    c = b.op("QuantizeLinear", "half_up", [half, b.const("below_one", 1 - 2.0**-8, f32), b.const("c_zero", 0, u8)],
             dtype=u8)
    if not format_spec(fmt).integer_shifts:
        exponent = b.op("DequantizeLinear", "exponent", [c, b.const("minus_ln2", -math.log(2.0), f32),
                                                         b.const("e_max", e_max, u8)], dtype=f32)
        shifted = b.op("QuantizeLinear", "shifted", [b.op("Exp", "pow2", [exponent], dtype=f32),
                                                     b.const("above_one", 1 + 2.0**-9, f32), b.const("s_zero", 0, u8)],
                       dtype=u8)
    else:  # integer hardware shifts: 2^E >> c
        shifted = b.op("BitShift", "shifted", [b.const("two_e_max", 2**e_max, u8), c], dtype=u8, direction="RIGHT")
    parity = b.op("Sub", "parity", [b.op("Add", "two_c", [c, c], dtype=u8), q], dtype=u8)
    odd = b.op("Mul", "odd", [shifted, parity], dtype=u8)
    v_codes, v_scale, v_zero = dequantized_v(b, node.inputs[1], key)
    unit = (log2_unit(scale, aq.bits) * v_scale).astype(f32)
    unit_odd = (unit * (SQRT2 - f32(1))).astype(f32)
    sum_parts(b, node, [scaled_integer_matmul(b, part, t, v_codes, v_zero, weight, fmt)
                        for part, t, weight in (("shifted", shifted, unit), ("odd", odd, unit_odd))])


@deploys("log2")
class Log2Softmax(PostSoftmaxPass):
    """Deploys the recipe's log2 quantizers at ``keys`` (calibration/quantizers/log2.py)."""

    name = "log2_softmax"
    kind = "log2"
    rewrite = staticmethod(_rewrite)
