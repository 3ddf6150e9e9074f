"""I&S-ViT's SULQ post-Softmax quantizer in the graph: integer codes, shifts, integer attn@v.

Codes: k = min(QuantizeLinear(ln(softmax + eta) - lo ln 2, delta ln 2), 2^b - 1) as uint8; code k
stands for eta * (2^i_k - 1) (codes/sulq.py). Per uint8 part p a Gather reads
code k's shift s_p (8 when 2^i_k is not in the part) and 2^7 >> s_p is the part's integer: a
BitShift in the portable ``qdq`` format (what integer hardware runs), the same table looked up
directly in ``ort`` (onnxruntime's BitShift is slow). Part 0's GEMM takes zero point 1 (the -1 of
2^i - 1), part 1 (only when some 2^i > 2^7) is weighted 256; one float unit eta * s_v per part.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..formats import format_spec
from ..codes.sulq import PART_BITS, graph_constants, part_unit, sulq_part_shifts
from .attention_av import PostSoftmaxPass, dequantized_v, scaled_integer_matmul, sum_parts
from .base import OpBuilder
from .deploy import deploys


def _rewrite(b: OpBuilder, node: gs.Node, softmax: gs.Node, aq, key: str, fmt: str) -> None:
    f32, u8 = np.float32, np.uint8
    probs = softmax.outputs[0]
    eta, lo, delta = (aq.params[k].reshape(()) for k in ("eta", "lo", "delta"))
    shifts = sulq_part_shifts(lo, delta, eta, aq.bits)
    c_lo, c_delta = graph_constants(lo, delta)
    ln_x = b.op("Log", "ln_shifted", [b.op("Add", "shifted", [probs, b.const("eta", eta, f32)], dtype=f32)],
                dtype=f32)
    k = b.op("QuantizeLinear", "sulq_codes_u8", [b.op("Sub", "log_offset", [ln_x, b.const("ln_lo", c_lo, f32)],
                                                      dtype=f32),
                                                 b.const("ln_delta", c_delta, f32), b.const("zero", 0, u8)], dtype=u8)
    k = b.op("Min", "sulq_codes", [k, b.const("top_code", 2**aq.bits - 1, u8)], dtype=u8)
    index = b.op("Cast", "code_index", [k], dtype=np.int64, to=onnx.TensorProto.INT64)
    v_codes, v_scale, v_zero = dequantized_v(b, node.inputs[1], key)
    top = 2 ** (PART_BITS - 1)
    sums = []
    for p, shift in enumerate(shifts):
        if not format_spec(fmt).integer_shifts:
            table = b.const(f"pow2_part{p}_table", top >> shift, u8)
            part = b.op("Gather", f"pow2_part{p}", [table, index], dtype=u8, axis=0)
        else:
            s = b.op("Gather", f"shift_part{p}", [b.const(f"shift_part{p}_table", shift, u8), index],
                     dtype=u8, axis=0)
            part = b.op("BitShift", f"pow2_part{p}", [b.const(f"two_pow7_part{p}", top, u8), s], dtype=u8, direction="RIGHT")
        unit = part_unit(eta, v_scale, p)
        sums.append(scaled_integer_matmul(b, f"part{p}", part, v_codes, v_zero, unit, fmt, a_zero=1 if p == 0 else 0))
    sum_parts(b, node, sums)


@deploys("sulq")
class SULQSoftmax(PostSoftmaxPass):
    """Deploys the recipe's SULQ quantizers at ``keys``."""

    name = "sulq_softmax"
    kind = "SULQ"
    rewrite = staticmethod(_rewrite)
