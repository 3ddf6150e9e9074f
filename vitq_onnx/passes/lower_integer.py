"""Lower dequantize-then-float matmuls to integer kernels (``ort`` format).

MatMul(DequantizeLinear(a), DequantizeLinear(b)) [+ bias] becomes onnxruntime's fused
MatMulIntegerToFloat: an int32 GEMM whose epilogue is float32(sum) * (scale_a*scale_b) + bias,
the order the simulation uses (checked bit for bit in the tests). A patch-embedding Conv (k x k,
stride k) becomes the same kernel over the image's patches; any other Conv becomes ConvInteger
-> Cast -> Mul -> Add. The sums are exact, so onnxruntime and the simulation agree to the last bit on
every matmul, and onnxruntime runs integer GEMMs instead of float ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassContext
from .common import conv_bias_split, linear_bias, quantized_products, scalar_zero_point, scale_product

_CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides", "auto_pad")


def _bias_of(node: gs.Node):
    """The Add of a constant bias vector that alone reads a Linear MatMul's output, if any."""
    add, index = linear_bias(node)
    if add is None or len(node.outputs[0].outputs) != 1 or add.inputs[index].values.ndim != 1:
        return None
    return add, add.inputs[index]


class LowerInteger(Pass):
    name = "lower_integer"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for node, module, a, b in quantized_products(graph):
            zps = [scalar_zero_point(a[2], f"{module}/a"), scalar_zero_point(b[2], f"{module}/b")]
            if node.op == "MatMul":
                _matmul(graph, node, module, a, b, zps)
            elif _patch_size(node, a[0]):
                _patchify_conv(graph, node, module, a, b, zps)
            else:
                _conv(graph, node, module, a, b, zps)
            node.outputs.clear()


def _matmul(graph, node, module, a, b, zps) -> None:
    out, bias = node.outputs[0], None
    fused = _bias_of(node)
    if fused is not None:
        add, bias = fused
        out = add.outputs[0]
        add.outputs.clear()
    _integer_gemm(graph, module, a[0], b[0], scale_product(graph, module, a[1], b[1], [-1]), zps, bias, out)


def _integer_gemm(graph, module, a_codes, b_codes, scale, zps, bias, out) -> None:
    """onnxruntime's MatMulIntegerToFloat: float32(a @ b) * scale (+ bias), scale_a folded in."""
    inputs = [a_codes, b_codes, gs.Constant(f"{module}/unit_scale", np.array(1.0, np.float32)), scale, *zps]
    if bias is not None:
        inputs.append(bias)
    graph.nodes.append(gs.Node("MatMulIntegerToFloat", f"{module}/MatMulIntegerToFloat", inputs=inputs,
                               outputs=[out], domain="com.microsoft"))


def _patch_size(node: gs.Node, codes: gs.Tensor) -> int:
    """k for a k x k, stride-k, unpadded, ungrouped Conv (a patch embedding) of a known image size."""
    at = node.attrs
    k = list(at.get("kernel_shape", []))
    shape = codes.inputs[0].inputs[0].shape if codes.inputs else None  # QuantizeLinear's input
    if len(k) != 2 or k[0] != k[1] or list(at.get("strides", [])) != k or any(at.get("pads", [0])) \
            or at.get("group", 1) != 1 or any(d != 1 for d in at.get("dilations", [1])) \
            or shape is None or not all(isinstance(d, int) for d in shape[1:]) or shape[2] % k[0] or shape[3] % k[0]:
        return 0
    return k[0]


def _patchify_conv(graph, node, module, a, b, zps) -> None:
    """A patch-embedding Conv as one integer GEMM over the image's non-overlapping patches
    (onnxruntime's MatMulIntegerToFloat is much faster than its ConvInteger): the same sums."""
    k = _patch_size(node, a[0])
    _, cin, h, w = a[0].inputs[0].inputs[0].shape
    weight = b[0].values
    cout = weight.shape[0]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    i64 = np.int64
    x = gs.Variable(f"{module}/patches_6d", dtype=a[0].dtype)
    graph.nodes.append(gs.Node("Reshape", f"{module}/patches_6d", outputs=[x], inputs=[
        a[0], gs.Constant(f"{module}/shape_6d", np.array([-1, cin, h // k, k, w // k, k], i64))]))
    xt = gs.Variable(f"{module}/patches_nhwc", dtype=a[0].dtype)
    graph.nodes.append(gs.Node("Transpose", f"{module}/patches_nhwc", attrs={"perm": [0, 2, 4, 1, 3, 5]},
                               inputs=[x], outputs=[xt]))
    rows = gs.Variable(f"{module}/patches", dtype=a[0].dtype)
    graph.nodes.append(gs.Node("Reshape", f"{module}/patches", outputs=[rows], inputs=[
        xt, gs.Constant(f"{module}/shape_rows", np.array([-1, (h // k) * (w // k), cin * k * k], i64))]))
    matrix = gs.Constant(f"{module}/weight_matrix", np.ascontiguousarray(weight.reshape(cout, -1).T))
    tokens = gs.Variable(f"{module}/tokens", dtype=np.float32)
    _integer_gemm(graph, module, rows, matrix, scale_product(graph, module, a[1], b[1], [-1]), zps, bias, tokens)
    channels = gs.Variable(f"{module}/channels_first", dtype=np.float32)
    graph.nodes.append(gs.Node("Transpose", f"{module}/channels_first", attrs={"perm": [0, 2, 1]},
                               inputs=[tokens], outputs=[channels]))
    graph.nodes.append(gs.Node("Reshape", f"{module}/feature_map", outputs=[node.outputs[0]], inputs=[
        channels, gs.Constant(f"{module}/shape_nchw", np.array([-1, cout, h // k, w // k], i64))]))


def _conv(graph, node, module, a, b, zps) -> None:
    scale = scale_product(graph, module, a[1], b[1], [1, -1, 1, 1])
    attrs = {k: v for k, v in node.attrs.items() if k in _CONV_ATTRS}
    bias = conv_bias_split(node)
    acc = gs.Variable(f"{module}/ConvInteger_int32", dtype=np.int32)
    graph.nodes.append(gs.Node("ConvInteger", f"{module}/ConvInteger", attrs=attrs, outputs=[acc],
                               inputs=[a[0], b[0], *zps]))
    acc_f = gs.Variable(f"{module}/ConvInteger_float", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", f"{module}/ConvInteger_cast", attrs={"to": onnx.TensorProto.FLOAT},
                               inputs=[acc], outputs=[acc_f]))
    out = node.outputs[0]
    scaled = out if bias is None else gs.Variable(f"{module}/ConvInteger_scaled", dtype=np.float32)
    graph.nodes.append(gs.Node("Mul", f"{module}/ConvInteger_scale", outputs=[scaled],
                               inputs=[acc_f, scale]))
    if bias is not None:
        graph.nodes.append(gs.Node("Add", f"{module}/ConvInteger_bias", outputs=[out], inputs=[scaled, bias]))
