"""Helpers for Linear layers in canonical form: MatMul on a [in, out] weight, then Add of a bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def linear_bias(matmul: gs.Node) -> tuple[gs.Node | None, int]:
    """The Add that adds a constant bias to ``matmul``'s output, and the bias's input index."""
    for reader in matmul.outputs[0].outputs:
        if reader.op == "Add":
            for i, t in enumerate(reader.inputs):
                if isinstance(t, gs.Constant):
                    return reader, i
    return None, -1


def add_to_bias(graph: gs.Graph, matmul: gs.Node, delta: np.ndarray) -> None:
    """bias += delta, creating the bias Add when the Linear had none."""
    add, index = linear_bias(matmul)
    if add is not None:
        bias = add.inputs[index]
        add.inputs[index] = gs.Constant(bias.name, (bias.values + delta).astype(np.float32))
        return
    module = matmul.name.rpartition("/")[0]
    out = matmul.outputs[0]
    product = gs.Variable(f"{matmul.name}_output_0", dtype=out.dtype)
    matmul.outputs = [product]
    graph.nodes.append(gs.Node("Add", f"{module}/Add", outputs=[out], inputs=[
        product, gs.Constant(f"{module}.bias", np.asarray(delta, np.float32))]))
