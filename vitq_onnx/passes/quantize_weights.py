"""Weights to integers: each quantized initializer becomes int8 codes + per-channel DequantizeLinear.

Codes come from rounding the graph's (folded) weights with the recipe's scales, or, when a method
trained the weights (block reconstruction), from the recipe itself. Also adds the recipe's bias
corrections (the output shift the weight rounding causes, or the trained bias change).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..codes.weights import weight_codes
from ..errors import VitqError
from ..naming import tensor_label
from ..recipe import split_key, tensor_key
from .base import Pass, PassContext, node_index
from .common import add_to_bias, packed_type


def _unsigned(codes: np.ndarray) -> np.ndarray:
    """The same grid as uint8 with zero point 128.

    onnxruntime's u8*s8 kernels on CPUs without VNNI add pairs of u8*s8 products in int16 and
    saturate when 8-bit weight codes meet 8-bit activation codes; u8*u8 kernels do not. Weights
    of 7 bits or fewer (255 * 64 * 2 < 2^15), and 8-bit weights whose input has 7 bits or fewer
    (127 * 128 * 2 < 2^15), cannot saturate and stay int8, the fast path on VNNI CPUs.
    (Forbidding the saturating pairs instead moves only 2 % of codes but cost DeiT-Ti 2.4 points
    of top-1 at W8/A8.)
    """
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def _codes(key: str, w: np.ndarray, wq, axis: int) -> np.ndarray:
    if wq.codes is None:
        return weight_codes(w, wq.scale.astype(np.float32), wq.bits, axis)
    codes = np.moveaxis(wq.codes.astype(np.int8), 0, axis)  # recipe codes are output-channels-first
    if codes.shape != w.shape:
        raise VitqError(f"recipe does not fit the graph: {key} codes {codes.shape}, weight {w.shape}")
    return np.ascontiguousarray(codes)


class QuantizeWeights(Pass):
    name = "quantize_weights"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key, wq in ctx.recipe.weights.items():
            node_name, index = split_key(key)
            node = nodes.get(node_name)
            if node is None or not isinstance(node.inputs[index], gs.Constant):
                raise VitqError(f"recipe does not fit the graph: no weight at '{key}'")
            w = node.inputs[index].values
            axis = 1 if node.op == "MatMul" else 0  # MatMul weights are [in, out]; Conv [out, in, ...]
            if w.shape[axis] != wq.scale.size:
                raise VitqError(f"recipe does not fit the graph: {key} has {w.shape[axis]} output "
                                f"channels, recipe {wq.scale.size}")
            scale = wq.scale.astype(np.float32)
            label = tensor_label(node_name, index)
            dtype = packed_type(wq.bits, ctx.format, signed=True, weights=True)
            codes, zero = _codes(key, w, wq, axis), np.zeros(scale.shape, np.int8)
            if wq.bits == 8 and ctx.recipe.activations[tensor_key(node_name, 0)].bits == 8 \
                    and ctx.target_cpu == "portable":
                codes, zero = _unsigned(codes), _unsigned(zero)
            if dtype is not None:
                codes, zero = codes.astype(dtype), zero.astype(dtype)
            codes = gs.Constant(f"{label}_int{wq.bits}", codes)
            zero = gs.Constant(f"{label}_zero_point", zero)
            out = gs.Variable(f"{label}_dequantized", dtype=np.float32, shape=list(w.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", f"{label}_dq", attrs={"axis": axis},
                                       inputs=[codes, gs.Constant(f"{label}_scale", scale), zero],
                                       outputs=[out]))
            node.inputs[index] = out
        for node_name, delta in ctx.recipe.bias_corrections.items():
            node = nodes.get(node_name)
            if node is None or node.op != "MatMul":
                raise VitqError(f"recipe does not fit the graph: no Linear MatMul '{node_name}'")
            add_to_bias(graph, node, delta)
