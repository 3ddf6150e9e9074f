"""Non-quantized float parameters in fewer bytes, with the exact values the simulation uses.

The recipe says how each is stored (``param_storage``). ``RoundParams``: "float16" parameters
(biases, LayerNorm affine) are rounded to float16 values; "int8" ones (embedding tables such as
pos_embed) become int8 codes with a per-channel scale and a DequantizeLinear, which onnxruntime
folds when the session loads. The simulation rounds the same PyTorch tensors with the same
arithmetic (``codes/storage.py``). ``StoreFloat16`` then writes every float32 initializer whose values
float16 holds exactly as float16 plus a Cast: lossless, and also folded at load.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..codes.storage import int8_channel_scale, int8_codes, stored_values
from ..errors import VitqError
from .base import Pass, PassContext

MIN_ELEMENTS = 64  # smaller float constants are not worth a Cast node


def _param_name(constant: str) -> str:
    return re.sub(r"__\d+$", "", constant)  # name_nodes' per-reader copies: bias__1 -> bias


def _compute_instead(graph: gs.Graph, constant: gs.Constant, op: str, suffix: str, node_suffix: str, inputs,
                     **attrs) -> None:
    """Every reader of ``constant`` reads ``op(inputs)`` instead: the same float32 values, stored smaller."""
    out = gs.Variable(f"{constant.name}_{suffix}", dtype=np.float32, shape=list(constant.values.shape))
    for reader in list(constant.outputs):
        reader.inputs[reader.inputs.index(constant)] = out
    graph.nodes.append(gs.Node(op, f"{constant.name}_{node_suffix}", attrs=attrs, inputs=inputs, outputs=[out]))


class RoundParams(Pass):
    name = "round_params"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        storage = ctx.recipe.param_storage
        found = set()
        for t in list(graph.tensors().values()):
            name = _param_name(t.name)
            if not isinstance(t, gs.Constant) or t.values.dtype != np.float32 or name not in storage:
                continue
            found.add(name)
            x = t.values
            if storage[name] == "float16":
                t.values = stored_values(x, "float16")
                continue
            scale = int8_channel_scale(x)
            codes = gs.Constant(f"{t.name}_int8", int8_codes(x, scale))
            _compute_instead(graph, t, "DequantizeLinear", "dequantized", "dq",
                             [codes, gs.Constant(f"{t.name}_scale", scale)], axis=-1)
        missing = sorted(set(storage) - found)
        if missing:
            raise VitqError(f"recipe does not fit the graph: no parameter '{missing[0]}' to store")


class StoreFloat16(Pass):
    name = "store_float16"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for t in list(graph.tensors().values()):
            if not isinstance(t, gs.Constant) or t.values.dtype != np.float32 or t.values.size < MIN_ELEMENTS:
                continue
            half = t.values.astype(np.float16)
            if not np.array_equal(half.astype(np.float32), t.values):
                continue
            _compute_instead(graph, t, "Cast", "float32", "cast", [gs.Constant(f"{t.name}_float16", half)],
                             to=onnx.TensorProto.FLOAT)
