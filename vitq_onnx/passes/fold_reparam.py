"""RepQ-ViT fold: per-channel post-LayerNorm factors into the LayerNorm affine and next Linear.

Reads ``recipe.reparams`` (r1, shift per channel) and edits initializers only, so the FP function
of the graph is unchanged while the per-channel quantizer becomes a per-tensor one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import VitqError
from .base import Pass, PassContext, node_index
from .common import add_to_bias

# ops that move or select channels-last values without mixing channels. Pad is Swin's padding to
# a window multiple: zero-sized at the standard input sizes, where the fold stays exact.
LAYOUT_OPS = {"Reshape", "Transpose", "Slice", "Concat", "Gather", "Squeeze", "Unsqueeze",
              "Identity", "Flatten", "ReduceMean", "Pad"}


def _reads_only_through_layout(norm: gs.Node, matmul: gs.Node) -> bool:
    tensor = matmul.inputs[0]
    while tensor is not norm.outputs[0]:
        if not tensor.inputs or tensor.inputs[0].op not in LAYOUT_OPS:
            return False
        tensor = tensor.inputs[0].inputs[0]
    return all(r.op in LAYOUT_OPS | {"MatMul", "Shape"} for r in norm.outputs[0].outputs)


class FoldReparam(Pass):
    name = "fold_reparam"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for rep in ctx.recipe.reparams:
            norm = nodes.get(rep.norm)
            if norm is None or norm.op != "LayerNormalization":
                raise VitqError(f"recipe does not fit the graph: no LayerNormalization '{rep.norm}'")
            gamma, beta = norm.inputs[1], norm.inputs[2]
            if len(rep.r1) != gamma.shape[-1]:
                raise VitqError(f"recipe does not fit the graph: {rep.norm} has {gamma.shape[-1]} "
                                f"channels, recipe {len(rep.r1)}")
            r1, shift = rep.r1.astype(np.float32), rep.shift.astype(np.float32)
            for name in rep.linears:
                mm = nodes.get(name)
                if mm is None or mm.op != "MatMul" or not isinstance(mm.inputs[1], gs.Constant):
                    raise VitqError(f"recipe does not fit the graph: no Linear MatMul '{name}'")
                if not _reads_only_through_layout(norm, mm):
                    raise VitqError(f"cannot fold {rep.norm} into {name}: other ops sit between them")
                w = mm.inputs[1].values  # [in, out]
                add_to_bias(graph, mm, -(shift.astype(np.float64) @ w.astype(np.float64)).astype(np.float32))
                mm.inputs[1] = gs.Constant(mm.inputs[1].name, (w * r1[:, None]).astype(np.float32))
            norm.inputs[1] = gs.Constant(gamma.name, (gamma.values / r1).astype(np.float32))
            norm.inputs[2] = gs.Constant(beta.name, ((beta.values + shift) / r1).astype(np.float32))
