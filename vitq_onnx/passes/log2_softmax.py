"""RepQ-ViT post-Softmax quantization in the graph: integer log2 codes, shifts, integer attn@v.

The softmax output leaves as uint8 codes q = clip(round(-2*log2(x/scale)), 0, Z). From there on
everything is integer until one final scale: a = 2^E >> ceil(q/2) (BitShift), split by the parity
of q (BitwiseAnd) into even and odd parts, each multiplied with v's integer codes (a float64 MatMul, exact for these sums);
the odd sum carries the extra sqrt(2) of the log-sqrt(2) grid as one float constant. No Pow, no
float exponent: the arithmetic of calibration.quantizers.log2_parts and the simulation.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.quantizers import LOG2_TO_CODE, log2_max_exponent, log2_zero_code
from ..errors import VitqError
from ..naming import tensor_label
from ..recipe import split_key
from .base import OpBuilder, Pass, PassContext, node_index


class Log2Softmax(Pass):
    name = "log2_softmax"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key, aq in ctx.recipe.activations.items():
            if aq.kind != "log2":
                continue
            node_name, index = split_key(key)
            node = nodes.get(node_name)
            if node is None or node.op != "MatMul":
                raise VitqError(f"recipe does not fit the graph: no attention MatMul at '{key}'")
            b = OpBuilder(graph, tensor_label(node_name, index), sep="_")
            f32, u32 = np.float32, np.uint32
            scale = np.float32(aq.scale.reshape(()))
            zero_code, e_max = log2_zero_code(aq.bits), log2_max_exponent(aq.bits)
            # quantize: float -> integer log2 codes (in float64, as quantizers.log2_codes)
            f64 = np.float64
            x = b.op("Cast", "f64", [node.inputs[index]], dtype=f64, to=onnx.TensorProto.DOUBLE)
            x = b.op("Div", "ratio", [x, b.const("scale", scale, f64)])
            x = b.op("Log", "ln", [x])
            x = b.op("Mul", "neg2log2", [x, b.const("to_code", LOG2_TO_CODE, f64)])
            x = b.op("Round", "rounded", [x])
            x = b.op("Clip", "clipped", [x, b.const("code_min", 0, f64), b.const("code_max", zero_code, f64)])
            codes = b.op("Cast", "log2_codes", [x], dtype=np.uint8, to=onnx.TensorProto.UINT8)
            # dequantize with shifts: 2^E >> ceil(q/2), even/odd split
            q = b.op("Cast", "codes_u32", [codes], dtype=u32, to=onnx.TensorProto.UINT32)
            one = b.const("one", 1, u32)
            half_up = b.op("BitShift", "exponent", [b.op("Add", "q_plus_1", [q, one]), one],
                           direction="RIGHT")
            shifted = b.op("BitShift", "pow2", [b.const("two_pow_e", 2**e_max, u32), half_up],
                           direction="RIGHT")
            odd = b.op("Mul", "odd_part", [shifted, b.op("BitwiseAnd", "parity", [q, one])])
            even = b.op("Sub", "even_part", [shifted, odd])
            # attn @ v on integers: float64 holds these sums exactly and has fast GEMM kernels
            v_codes, v_scale, v_zero = _dequantized_from(node.inputs[1], key)
            v = b.op("Sub", "v_int", [b.op("Cast", "v_f64", [v_codes], dtype=f64, to=onnx.TensorProto.DOUBLE),
                                      b.const("v_zero_point", v_zero, f64)])
            sums = [b.op("MatMul", f"{part}_sum", [b.op("Cast", f"{part}_f64", [t], dtype=f64,
                                                        to=onnx.TensorProto.DOUBLE), v], dtype=f64)
                    for part, t in (("even", even), ("odd", odd))]
            even_f, odd_f = (b.op("Cast", f"{part}_f", [t], dtype=f32, to=onnx.TensorProto.FLOAT)
                             for part, t in zip(("even_sum", "odd_sum"), sums))
            odd_f = b.op("Mul", "odd_sqrt2", [odd_f, b.const("sqrt2", math.sqrt(2.0), f32)])
            total = b.op("Add", "sum", [even_f, odd_f])
            unit = np.float32(np.float32(scale * np.float32(2.0**-e_max)) * v_scale)
            out = node.outputs[0]
            node.outputs.clear()
            graph.nodes.append(gs.Node("Mul", f"{node_name}_scaled", outputs=[out],
                                       inputs=[total, b.const("unit", unit, f32)]))


def _dequantized_from(tensor: gs.Tensor, key: str):
    """(codes, scale, zero point) of a per-tensor DequantizeLinear output."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or dq.inputs[1].values.size != 1:
        raise VitqError(f"{key}: the other attention input must be quantized per tensor first")
    return dq.inputs[0], np.float32(dq.inputs[1].values), int(dq.inputs[2].values)
