"""What the post-Softmax passes share: the attention MatMul's Softmax and v, and integer attn@v.

The log2 (``log2_softmax.py``), log2-table (``log2_table_softmax.py``) and SULQ
(``sulq_softmax.py``) quantizers turn the probabilities into small unsigned integers and multiply
them with v's codes in integer GEMMs, each sum scaled by one float unit; this module holds those
common steps.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import VitqError
from ..formats import format_spec
from ..recipe import split_key
from ..naming import tensor_label
from .base import OpBuilder, Pass, PassContext, node_index
from .common import dequantize_input


class PostSoftmaxPass(Pass):
    """Deploys the recipe's post-Softmax quantizers of one kind at ``keys``: each attention MatMul
    a key names is rewritten by ``rewrite``, its new ops named after the quantized tensor."""

    kind = ""  # the quantizer kind, as errors name it

    def __init__(self, keys: list[str]):
        self.keys = keys

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key in self.keys:
            node, softmax = attention_matmul(nodes, key, self.kind)
            b = OpBuilder(graph, tensor_label(*split_key(key)), sep="_")
            self.rewrite(b, node, softmax, ctx.recipe.activations[key], key, ctx.format)

    @staticmethod
    def rewrite(b: OpBuilder, node: gs.Node, softmax: gs.Node, aq, key: str, fmt: str) -> None:
        raise NotImplementedError


def attention_matmul(nodes: dict[str, gs.Node], key: str, kind: str) -> tuple[gs.Node, gs.Node]:
    """(MatMul, Softmax) of the attention product whose first input ``key`` names."""
    node_name, index = split_key(key)
    node = nodes.get(node_name)
    if node is None or node.op != "MatMul" or index != 0:
        raise VitqError(f"recipe does not fit the graph: no attention MatMul at '{key}'")
    tensor = node.inputs[0]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Softmax" or len(tensor.outputs) != 1 \
            or producer.attrs.get("axis", -1) != -1:
        raise VitqError(f"{key}: {kind} quantization needs a last-axis Softmax read only by this MatMul")
    return node, producer


def log_codes(b: OpBuilder, softmax: gs.Node, ln_scale, step, zero_code: int, name: str, step_name: str):
    """uint8 codes min(QuantizeLinear(ln(scale) - LogSoftmax(x), step), Z) of the Softmax's
    probabilities: round half to even, saturating at 0 (calibration.quantizers.log2.log_codes_of_log)."""
    f32, u8 = np.float32, np.uint8
    log_x = b.op("LogSoftmax", "log_softmax", [softmax.inputs[0]], dtype=f32, axis=-1)
    y = b.op("Sub", "ln_ratio", [b.const("ln_scale", ln_scale, f32), log_x], dtype=f32)
    q = b.op("QuantizeLinear", f"{name}_u8", [y, b.const(step_name, step, f32), b.const("zero", 0, u8)], dtype=u8)
    return b.op("Min", name, [q, b.const("zero_code", zero_code, u8)], dtype=u8)


def scaled_integer_matmul(b: OpBuilder, part: str, a, v_codes, v_zero, scale, fmt: str,
                          a_zero: int = 0) -> gs.Variable:
    """float32((a - a_zero) @ (v - v_zero)) * scale: onnxruntime's fused kernel, or standard ops
    for ``qdq``."""
    f32 = np.float32
    a_zero = b.const(f"{part}_zero", a_zero, np.uint8)
    if format_spec(fmt).ort_kernels:
        return b.op("MatMulIntegerToFloat", f"{part}_sum", [a, v_codes, b.const(f"{part}_a_scale", 1.0, f32),
                                                           b.const(f"{part}_unit", scale, f32), a_zero, v_zero],
                    dtype=f32, domain="com.microsoft")
    sums = b.op("MatMulInteger", f"{part}_sum_int32", [a, v_codes, a_zero, v_zero], dtype=np.int32)
    sums = b.op("Cast", f"{part}_sum_float", [sums], dtype=f32, to=onnx.TensorProto.FLOAT)
    return b.op("Mul", f"{part}_sum", [sums, b.const(f"{part}_unit", scale, f32)], dtype=f32)


def dequantized_v(b: OpBuilder, tensor: gs.Tensor, key: str):
    """(codes, scale, zero point) of a per-tensor DequantizeLinear output, in 8-bit containers."""
    found = dequantize_input(tensor)
    if found is None or found[1].size != 1:
        raise VitqError(f"{key}: the other attention input must be quantized per tensor first")
    codes, scale, zero = found
    if zero.values.dtype in (ml_dtypes.int4, ml_dtypes.uint4):  # qdq format: widen
        signed = zero.values.dtype == ml_dtypes.int4
        to = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
        codes = b.op("Cast", "v_codes_8bit", [codes], dtype=np.int8 if signed else np.uint8, to=to)
        zero = b.const("v_zero_point_8bit", zero.values, np.int8 if signed else np.uint8)
    return codes, np.float32(scale.reshape(())), zero


def sum_parts(b: OpBuilder, node: gs.Node, sums: list[gs.Variable]) -> None:
    """The attention output is the parts' scaled sums added in order (one part: itself)."""
    out = node.outputs[0]
    node.outputs.clear()
    if len(sums) == 1:
        producer = sums[0].inputs[0]
        producer.outputs.clear()
        producer.outputs.append(out)
        return
    total = sums[0]
    for i, s in enumerate(sums[1:], 1):
        total = b.op("Add", "sum" if i == len(sums) - 1 else f"sum_{i}", [total, s],
                     out=out if i == len(sums) - 1 else None, dtype=np.float32)
