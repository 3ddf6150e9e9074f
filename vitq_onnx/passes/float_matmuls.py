"""After the rewrites: no float product of two activations is left that the recipe does not name.

A quantized matmul reads integer codes (DequantizeLinear, or an integer kernel); a Linear kept
float multiplies by a constant weight. A MatMul, Einsum or Gemm whose two inputs are both computed
from the image and neither dequantized is a float activation-by-activation product: allowed only
where the recipe kept its module float (``float_layers``), else the export fails rather than
deliver a model quantized less than asked.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import VitqError
from .base import Pass, PassContext

_PRODUCTS = ("MatMul", "Einsum", "Gemm")


def _constant(tensor: gs.Tensor, memo: dict[str, bool]) -> bool:
    """Computed from initializers and Constant nodes alone (a weight, however it is stored)."""
    if isinstance(tensor, gs.Constant):
        return True
    if tensor.name not in memo:
        producer = tensor.inputs[0] if tensor.inputs else None
        memo[tensor.name] = producer is not None and (producer.op == "Constant" or all(
            _constant(t, memo) for t in producer.inputs if not t.is_empty()))
    return memo[tensor.name]


def _dequantized(tensor: gs.Tensor) -> bool:
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op == "DequantizeLinear"


def float_products(graph: gs.Graph) -> list[gs.Node]:
    """The float activation-by-activation products of ``graph``."""
    memo: dict[str, bool] = {}
    return [n for n in graph.nodes if n.op in _PRODUCTS and len(n.inputs) >= 2
            and not any(_constant(t, memo) or _dequantized(t) for t in n.inputs[:2])]


def named_by(node: gs.Node, float_layers: list[str]) -> bool:
    """Does a kept-float entry cover this node? ``blocks.8.attn.matmul_av`` names the node
    ``blocks.8.attn/matmul_av``; a module path (``blocks.0.attn``) names every node inside it."""
    module, _, op = node.name.partition("/")
    return any(module == f or module.startswith(f + ".") or f"{module}.{op}" == f for f in float_layers)


class CheckFloatMatmuls(Pass):
    name = "check_float_matmuls"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        unnamed = [n.name for n in float_products(graph) if not named_by(n, ctx.recipe.float_layers)]
        if unnamed:
            raise VitqError(f"{len(unnamed)} float matmuls of two activations are left in the graph that the recipe "
                            f"does not keep float, e.g. '{unnamed[0]}': the model would be quantized less than asked")
