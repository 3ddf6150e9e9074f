"""RepQ-ViT post-Softmax quantization in the graph: log2 codes, shifts, integer attn@v.

Codes: the Softmax becomes a LogSoftmax, and q = min(QuantizeLinear(ln(scale) - ln(x),
ln(sqrt(2))), Z) as uint8 (Z, the top code, means zero). Dequantizing is a shift: code q stands
for unit * (shifted + (sqrt(2) - 1) * odd), shifted = 2^E >> ceil(q/2) and odd = shifted when q
is odd (calibration.quantizers.log2_parts): the log-sqrt(2) quantizer reparameterized to base 2.
onnxruntime's integer BitShift is slow, so the integers are made with fast float kernels and
rounded back exactly: ceil(q/2) = round(0.5 q / (1 - 2^-8)) and 2^(E-c) = round(exp((E - c) ln 2)
/ (1 + 2^-9)), each far from a rounding tie. Two integer GEMMs multiply them with v's codes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.quantizers.log2 import (
    LOG2_STEP,
    SQRT2,
    log2_log_scale,
    log2_max_exponent,
    log2_unit,
    log2_zero_code,
)
from ..errors import VitqError
from ..naming import tensor_label
from ..recipe import split_key
from .base import OpBuilder, Pass, PassContext, node_index
from .lower_integer import dequantize_input


class Log2Softmax(Pass):
    """Deploys the recipe's log2 quantizers at ``keys`` (calibration/quantizers/log2.py)."""

    name = "log2_softmax"

    def __init__(self, keys: list[str]):
        self.keys = keys

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key in self.keys:
            aq = ctx.recipe.activations[key]
            node_name, index = split_key(key)
            node = nodes.get(node_name)
            if node is None or node.op != "MatMul" or index != 0:
                raise VitqError(f"recipe does not fit the graph: no attention MatMul at '{key}'")
            softmax = _softmax_of(node.inputs[0], key)
            b = OpBuilder(graph, tensor_label(node_name, index), sep="_")
            log_x = b.op("LogSoftmax", "log_softmax", [softmax.inputs[0]], dtype=np.float32, axis=-1)
            _rewrite(b, node, log_x, aq, key, ctx.format)


def _softmax_of(tensor: gs.Tensor, key: str) -> gs.Node:
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Softmax" or len(tensor.outputs) != 1 \
            or producer.attrs.get("axis", -1) != -1:
        raise VitqError(f"{key}: log2 quantization needs a last-axis Softmax read only by this MatMul")
    return producer


def _rewrite(b: OpBuilder, node: gs.Node, log_x: gs.Variable, aq, key: str, fmt: str) -> None:
    f32, u8 = np.float32, np.uint8
    scale, e_max = f32(aq.params["scale"].reshape(())), log2_max_exponent(aq.bits)
    y = b.op("Sub", "ln_ratio", [b.const("ln_scale", log2_log_scale(scale).numpy(), f32), log_x], dtype=f32)
    q = b.op("QuantizeLinear", "log2_codes_u8", [y, b.const("ln_sqrt2", LOG2_STEP.numpy(), f32),
                                                 b.const("zero", 0, u8)], dtype=u8)
    q = b.op("Min", "log2_codes", [q, b.const("zero_code", log2_zero_code(aq.bits), u8)], dtype=u8)
    half = b.op("DequantizeLinear", "half_q", [q, b.const("half", 0.5, f32), b.const("half_zero", 0, u8)], dtype=f32)
    c = b.op("QuantizeLinear", "half_up", [half, b.const("below_one", 1 - 2.0**-8, f32), b.const("c_zero", 0, u8)],
             dtype=u8)
    exponent = b.op("DequantizeLinear", "exponent", [c, b.const("minus_ln2", -math.log(2.0), f32),
                                                     b.const("e_max", e_max, u8)], dtype=f32)
    shifted = b.op("QuantizeLinear", "shifted", [b.op("Exp", "pow2", [exponent], dtype=f32),
                                                 b.const("above_one", 1 + 2.0**-9, f32), b.const("s_zero", 0, u8)],
                   dtype=u8)
    parity = b.op("Sub", "parity", [b.op("Add", "two_c", [c, c], dtype=u8), q], dtype=u8)
    odd = b.op("Mul", "odd", [shifted, parity], dtype=u8)
    v_codes, v_scale, v_zero = _dequantized_from(b, node.inputs[1], key)
    unit = (log2_unit(scale, aq.bits) * v_scale).astype(f32)
    unit_odd = (unit * (SQRT2 - 1).numpy()).astype(f32)
    sums = [_scaled_integer_matmul(b, part, t, v_codes, v_zero, weight, fmt)
            for part, t, weight in (("shifted", shifted, unit), ("odd", odd, unit_odd))]
    out = node.outputs[0]
    node.outputs.clear()
    b.op("Add", "sum", sums, out=out)


def _scaled_integer_matmul(b: OpBuilder, part: str, a, v_codes, v_zero, scale, fmt: str) -> gs.Variable:
    """float32(a @ (v - v_zero)) * scale: onnxruntime's fused kernel, or standard ops for ``qdq``."""
    f32 = np.float32
    a_zero = b.const(f"{part}_zero", 0, np.uint8)
    if fmt == "ort":
        return b.op("MatMulIntegerToFloat", f"{part}_sum", [a, v_codes, b.const(f"{part}_a_scale", 1.0, f32),
                                                           b.const(f"{part}_unit", scale, f32), a_zero, v_zero],
                    dtype=f32, domain="com.microsoft")
    sums = b.op("MatMulInteger", f"{part}_sum_int32", [a, v_codes, a_zero, v_zero], dtype=np.int32)
    sums = b.op("Cast", f"{part}_sum_float", [sums], dtype=f32, to=onnx.TensorProto.FLOAT)
    return b.op("Mul", f"{part}_sum", [sums, b.const(f"{part}_unit", scale, f32)], dtype=f32)


def _dequantized_from(b: OpBuilder, tensor: gs.Tensor, key: str):
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
