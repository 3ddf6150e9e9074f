"""Keep every LayerNorm the kernel the simulation runs: a residual Add that alone feeds one becomes Sum.

onnxruntime fuses ``Add -> LayerNormalization`` into its SkipLayerNormalization when the Add
feeds nothing else and the shapes of both its inputs are known (the model's last norm, in the
``qdq`` format). That kernel normalizes with other arithmetic: about half of its outputs differ
from LayerNormalization's in the last bits, which moves a code of the quantizer after it or,
when the head is kept float, the logits. ``Sum`` of two tensors is the same IEEE addition and
matches no fusion pattern.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassContext


def fusible_adds(graph: gs.Graph) -> list[gs.Node]:
    """Add nodes of two computed tensors whose output only a LayerNormalization reads."""
    found = []
    for norm in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        x = norm.inputs[0]
        add = x.inputs[0] if x.inputs else None
        if add is not None and add.op == "Add" and len(x.outputs) == 1 \
                and not any(isinstance(t, gs.Constant) for t in add.inputs):
            found.append(add)
    return found


class UnfusedNorm(Pass):
    name = "unfused_norm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for add in fusible_adds(graph):
            add.op = "Sum"
