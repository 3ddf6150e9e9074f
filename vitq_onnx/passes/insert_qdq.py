"""Uniform activation quantization: QuantizeLinear/DequantizeLinear on each recipe tensor.

Codes below 8 bits live on the same grid in an 8-bit container (``ort`` format) or in ONNX
uint4/int4 (``qdq`` format, <= 4 bits); a float Clip before QuantizeLinear bounds them to 2^bits
levels when the container holds more. The second operand of an activation-by-activation matmul (k, v) is stored signed below 8
bits (at 8 bits too for ``--target-cpu vnni``): the same grid shifted by 2^(bits-1), so
onnxruntime picks its faster u8*s8 kernels, which cannot saturate at these widths.
(Clipping the 8-bit codes after QuantizeLinear instead of the float input before it was tried:
the Clips took half the time but the QuantizeLinear and DequantizeLinear nodes took more, no
gain on DeiT-Ti W4/A4.)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import VitqError
from ..naming import tensor_label
from ..recipe import split_key
from .base import Pass, PassContext, node_index
from .common import packed_type
from .deploy import deploys


@deploys("uniform")
class InsertQDQ(Pass):
    """Deploys the recipe's uniform quantizers at ``keys`` (calibration/quantizers/uniform.py)."""

    name = "insert_qdq"

    def __init__(self, keys: list[str]):
        self.keys = keys

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key in self.keys:
            aq = ctx.recipe.activations[key]
            node_name, index = split_key(key)
            node = nodes.get(node_name)
            if node is None or index >= len(node.inputs):
                raise VitqError(f"recipe does not fit the graph: no tensor at '{key}'")
            label = tensor_label(node_name, index)
            scale = np.float32(aq.params["scale"].reshape(()))
            zp = int(aq.params["zero_point"].reshape(()))
            qmax = 2**aq.bits - 1
            signed = _activation_rhs(node, index) and (aq.bits < 8 or ctx.target_cpu == "vnni")
            offset = 2 ** (aq.bits - 1) if signed else 0
            dtype = packed_type(aq.bits, ctx.format, signed=signed)
            container = np.int8 if signed else np.uint8
            source = node.inputs[index]
            if aq.bits < (8 if dtype is None else 4):  # fewer levels than the container holds
                lo, hi = np.float32(-zp) * scale, np.float32(qmax - zp) * scale
                source = _clip(graph, label, source, lo, hi, packed=dtype is not None)
            codes = gs.Variable(f"{label}_{'int' if signed else 'uint'}{aq.bits}",
                                dtype=container if dtype is None else None)
            zero = gs.Constant(f"{label}_zero_point", np.array(zp - offset, container).astype(dtype or container))
            scale_c = gs.Constant(f"{label}_scale", np.array(scale, np.float32))
            graph.nodes.append(gs.Node("QuantizeLinear", f"{label}_q", inputs=[source, scale_c, zero],
                                       outputs=[codes]))
            out = gs.Variable(f"{label}_dequantized", dtype=np.float32)
            graph.nodes.append(gs.Node("DequantizeLinear", f"{label}_dq", inputs=[codes, scale_c, zero],
                                       outputs=[out]))
            node.inputs[index] = out


def _clip(graph: gs.Graph, label: str, source: gs.Tensor, lo, hi, packed: bool) -> gs.Variable:
    """Bound x to [lo, hi] before QuantizeLinear. Into a 4-bit container as Max/Min: onnxruntime
    (1.32) fails to load a Clip that feeds a uint4 QuantizeLinear (its Clip fusion)."""
    low, high = (gs.Constant(f"{label}_{n}", np.array(v, np.float32)) for n, v in (("min", lo), ("max", hi)))
    clipped = gs.Variable(f"{label}_clipped", dtype=np.float32)
    if not packed:
        graph.nodes.append(gs.Node("Clip", f"{label}_clip", inputs=[source, low, high], outputs=[clipped]))
        return clipped
    floor = gs.Variable(f"{label}_floored", dtype=np.float32)
    graph.nodes.append(gs.Node("Max", f"{label}_clip_low", inputs=[source, low], outputs=[floor]))
    graph.nodes.append(gs.Node("Min", f"{label}_clip", inputs=[floor, high], outputs=[clipped]))
    return clipped


def _activation_rhs(node: gs.Node, index: int) -> bool:
    """Is this the right-hand input of a matmul of two activations (attention's k or v)?"""
    return node.op == "MatMul" and index == 1 and not isinstance(node.inputs[0], gs.Constant)
