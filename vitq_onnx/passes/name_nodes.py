"""Canonical node names and Linear layers in one form.

The exporter names nodes by module scope (``/blocks/blocks.0/attn/qkv/MatMul``); this pass renames
them to ``blocks.0.attn.qkv/MatMul``, names the two attention matmuls ``<attn>/matmul_qk`` and
``<attn>/matmul_av``, and rewrites Gemm (2-D Linear, e.g. the head) as MatMul + Add so every Linear
is a MatMul on a [in, out] weight, named ``<module>.weight_t`` (the exporter's ``onnx::MatMul_206``
would be all Netron shows of a layer kept float). Shared constants are copied per node. Every
later pass and every recipe key relies on these names.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import VitqError
from ..naming import AV, QK
from .base import Pass, PassContext


def scope_name(exported: str) -> str:
    """'/layers/layers.0/blocks/blocks.1/attn/qkv/MatMul' -> 'layers.0.blocks.1.attn.qkv/MatMul'."""
    if not exported.startswith("/"):
        return exported
    *scopes, op = exported[1:].split("/")
    path: list[str] = []
    for comp in scopes:
        if path and comp.startswith(path[-1] + "."):
            path[-1] = comp  # a Sequential child: 'blocks' + 'blocks.1' -> 'blocks.1', 'proj.0' + 'proj.0.0'
        else:
            path.append(comp)
    module = ".".join(path)
    return f"{module}/{op}" if module else op


def _gemm_to_matmul(graph: gs.Graph, node: gs.Node) -> None:
    a = node.attrs
    weight = node.inputs[1]
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0) \
            or not isinstance(weight, gs.Constant):
        raise VitqError(f"unsupported Gemm {node.name}: only Linear layers (x @ W^T + b)")
    values = weight.values.T if a.get("transB", 0) else weight.values
    module = node.name.rpartition("/")[0]
    w = gs.Constant(f"{module}.weight_t", np.ascontiguousarray(values))
    out = node.outputs[0]
    if len(node.inputs) > 2:
        mm = gs.Variable(f"{module}/MatMul_output_0", dtype=out.dtype)
        graph.nodes.append(gs.Node("MatMul", f"{module}/MatMul", inputs=[node.inputs[0], w], outputs=[mm]))
        graph.nodes.append(gs.Node("Add", f"{module}/Add", inputs=[mm, node.inputs[2]], outputs=[out]))
    else:
        graph.nodes.append(gs.Node("MatMul", f"{module}/MatMul", inputs=[node.inputs[0], w], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()


def _activation_matmul(node: gs.Node) -> bool:
    return node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs)


MIXED_PROBABILITIES_DEPTH = 6  # ops between a Softmax and attn@v when the probabilities are mixed


def _mixed_reader(softmax: gs.Node) -> gs.Node | None:
    """The activation-only MatMul that reads the Softmax's output through a chain of single-reader
    ops (talking heads: Transpose, a Linear across heads, Transpose), or None."""
    tensor = softmax.outputs[0]
    for _ in range(MIXED_PROBABILITIES_DEPTH):
        if len(tensor.outputs) != 1:
            return None
        node = tensor.outputs[0]
        if _activation_matmul(node):
            return node
        if len(node.outputs) != 1:
            return None
        tensor = node.outputs[0]
    return None


def _name_attention(graph: gs.Graph) -> None:
    """The MatMul that reads a Softmax is attn@v; the activation-only MatMul before it is q@k^T.
    A Softmax no MatMul reads may reach attn@v through a few single-reader ops (``_mixed_reader``);
    the walk back to q@k^T follows each op's first input that is not a constant."""
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        readers = [n for n in softmax.outputs[0].outputs if n.op == "MatMul"]
        if not readers:
            readers = [n for n in (_mixed_reader(softmax),) if n is not None]
        if len(readers) != 1:
            continue
        av = readers[0]
        qk, node = None, softmax
        while qk is None:
            inputs = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.inputs]
            if not inputs:
                break
            node = inputs[0].inputs[0]
            if _activation_matmul(node):
                qk = node
        if qk is None:
            raise VitqError(f"no q@k^T MatMul found before {softmax.name}")
        module = av.name.rpartition("/")[0]
        av.name, qk.name = f"{module}/{AV}", f"{module}/{QK}"


def _own_constants(graph: gs.Graph) -> None:
    """Give every node its own copy of each constant it reads.

    The exporter shares identical initializers (e.g. zero biases of a randomly initialized model)
    between layers, directly or through Identity nodes; later passes edit weights and biases per
    layer, so sharing would leak one layer's edit into another.
    """
    for node in [n for n in graph.nodes if n.op == "Identity" and isinstance(n.inputs[0], gs.Constant)]:
        const, out = node.inputs[0], node.outputs[0]
        for reader in list(out.outputs):
            reader.inputs[reader.inputs.index(out)] = gs.Constant(out.name, const.values.copy())
        node.outputs.clear()
    copies = 0
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and len(t.outputs) > 1 and t.outputs[0] is not node:
                copies += 1
                node.inputs[i] = gs.Constant(f"{t.name}__{copies}", t.values.copy())


class NameNodes(Pass):
    name = "name_nodes"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        _own_constants(graph)
        graph.cleanup()
        for node in graph.nodes:
            node.name = scope_name(node.name)
        for node in [n for n in graph.nodes if n.op == "Gemm"]:
            _gemm_to_matmul(graph, node)
        graph.cleanup()
        for node in [n for n in graph.nodes if n.op == "MatMul" and n.name.endswith("/MatMul")]:
            weight = node.inputs[1]
            if isinstance(weight, gs.Constant) and weight.name.startswith("onnx::"):
                weight.name = f"{node.name.rpartition('/')[0]}.weight_t"
        _name_attention(graph)
        seen: dict[str, int] = {}
        for node in graph.nodes:  # keep names unique whatever the exporter did
            if node.name in seen:
                seen[node.name] += 1
                node.name = f"{node.name}__{seen[node.name]}"
            else:
                seen[node.name] = 0
