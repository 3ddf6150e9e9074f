"""Scales after the product (``qdq`` format): DequantizeLinear to integers, float matmul, one Mul.

onnxruntime runs 4-bit QDQ as float: DequantizeLinear, then a float GEMM whose rounding depends
on its summation order, and at 4 bits those last bits flip codes downstream. Here the
DequantizeLinear feeding each MatMul/Conv keeps its codes and zero point but scale 1, so the
GEMM sums small integers, exactly in float32 in any order (|sum| < 2^24 up to 6 bits; 8-bit
QDQ onnxruntime lowers to integer kernels itself), and one Mul by scale_a*scale_b follows: the
same float32(sum) * (scale_a*scale_b) + bias that the ``ort`` format and the simulation compute.
Every op stays standard ONNX (QuantizeLinear/DequantizeLinear with int4/uint4, MatMul, Conv, Mul).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext
from .common import (
    conv_bias_split,
    quantized_products,
    scalar_zero_point,
    scale_product,
)


class FactorScales(Pass):
    name = "factor_scales"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for node, module, a, b in quantized_products(graph):
            one = gs.Constant(f"{module}/unit_scale", np.array(1.0, np.float32))
            for i, (codes, _, zero) in enumerate((a, b)):
                integers = gs.Variable(f"{module}/{'ab'[i]}_integers", dtype=np.float32)
                graph.nodes.append(gs.Node("DequantizeLinear", f"{module}/{'ab'[i]}_integers_dq", outputs=[integers],
                                           inputs=[codes, one, scalar_zero_point(zero, f"{module}/{'ab'[i]}")]))
                node.inputs[i] = integers
            bias = conv_bias_split(node) if node.op == "Conv" else None
            scale = scale_product(graph, module, a[1], b[1], [1, -1, 1, 1] if node.op == "Conv" else [-1])
            out = node.outputs[0]
            sums = gs.Variable(f"{module}/integer_sums", dtype=np.float32)
            node.outputs = [sums]
            scaled = out if bias is None else gs.Variable(f"{module}/scaled", dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", f"{module}/scale", outputs=[scaled],
                                       inputs=[sums, scale]))
            if bias is not None:
                graph.nodes.append(gs.Node("Add", f"{module}/bias", outputs=[out], inputs=[scaled, bias]))
