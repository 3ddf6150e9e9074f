"""Lower dequantize-then-float matmuls to integer kernels (``ort`` format).

MatMul(DequantizeLinear(a), DequantizeLinear(b)) becomes MatMulInteger(a, b) -> Cast -> Mul by
scale_a*scale_b (per output channel for weights); Conv likewise becomes ConvInteger. The sums are
exact int32, so onnxruntime and the simulation agree to the last bit on every matmul, and
onnxruntime runs integer GEMMs instead of float ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassContext

_CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides", "auto_pad")


def _dequantize_input(tensor: gs.Tensor):
    """(codes, scale, zero point) when ``tensor`` comes straight from a DequantizeLinear."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "DequantizeLinear" or not isinstance(node.inputs[1], gs.Constant):
        return None
    return node.inputs[0], node.inputs[1].values.astype(np.float32), node.inputs[2]


def _scalar_zero_point(zp: gs.Constant, name: str) -> gs.Constant:
    """Per-channel zero points that are all equal (ours always are) as one scalar."""
    values = zp.values.reshape(-1)
    if not (values == values[0]).all():
        raise ValueError(f"{name}: per-channel zero points differ")
    return gs.Constant(f"{name}_zp", np.array(values[0], dtype=values.dtype))


class LowerInteger(Pass):
    name = "lower_integer"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for node in [n for n in graph.nodes if n.op in ("MatMul", "Conv")]:
            a, b = (_dequantize_input(t) for t in node.inputs[:2])
            if a is None or b is None or a[1].size != 1:
                continue
            op = "MatMulInteger" if node.op == "MatMul" else "ConvInteger"
            # blocks.0.attn.qkv/MatMul -> blocks.0.attn.qkv/MatMulInteger...; attention matmuls
            # keep their own name: blocks.0.attn/matmul_qk/MatMulInteger...
            suffix = "/" + node.op
            module = node.name[: -len(suffix)] if node.name.endswith(suffix) else node.name
            scale = np.asarray(np.float32(a[1].reshape(())) * b[1], dtype=np.float32)
            attrs = {}
            if node.op == "Conv":
                scale = scale.reshape(1, -1, 1, 1)
                attrs = {k: v for k, v in node.attrs.items() if k in _CONV_ATTRS}
            acc = gs.Variable(f"{module}/{op}_int32", dtype=np.int32)
            graph.nodes.append(gs.Node(op, f"{module}/{op}", attrs=attrs, outputs=[acc], inputs=[
                a[0], b[0], _scalar_zero_point(a[2], f"{module}/{op}_a"),
                _scalar_zero_point(b[2], f"{module}/{op}_b")]))
            acc_f = gs.Variable(f"{module}/{op}_float", dtype=np.float32)
            graph.nodes.append(gs.Node("Cast", f"{module}/{op}_cast", attrs={"to": onnx.TensorProto.FLOAT},
                                       inputs=[acc], outputs=[acc_f]))
            out = node.outputs[0]
            bias = node.inputs[2] if node.op == "Conv" and len(node.inputs) > 2 else None
            scaled = out if bias is None else gs.Variable(f"{module}/{op}_scaled", dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", f"{module}/{op}_scale", outputs=[scaled],
                                       inputs=[acc_f, gs.Constant(f"{module}/{op}_scale_ab", scale)]))
            if bias is not None:
                graph.nodes.append(gs.Node("Add", f"{module}/{op}_bias", outputs=[out], inputs=[
                    scaled, gs.Constant(f"{module}/{op}_bias_c", bias.values.reshape(1, -1, 1, 1))]))
            node.outputs.clear()
