"""Quantize before moving data: QuantizeLinear (and its Clip) above Transpose, Squeeze, Split and
power-of-two Muls.

Attention's q, k and v come out of one qkv GEMM as float32 and are split, squeezed, transposed
and (q) scaled by 1/sqrt(head_dim) before each is quantized: several float passes over the
tensor. A per-tensor QuantizeLinear, and a Clip with constant bounds, commute with any op that
only moves elements; QuantizeLinear(x * 2^n, s) = QuantizeLinear(x, s / 2^n) and
Clip(x * 2^n, lo, hi) = Clip(x, lo / 2^n, hi / 2^n) * 2^n exactly (the same real numbers are
compared or divided and rounded once). The QuantizeLinears of every output of a Split merge into
one per-axis QuantizeLinear of its input when they share the code type and have no Clip (8-bit),
in the formats that allow it (not ``openvino``, which refuses per-axis activation quantizers).
So the moves run on uint8 codes, a quarter of the bytes, the Mul disappears, and every code stays
the same bit for bit.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx_graphsurgeon as gs

from ..formats import format_spec
from .base import Pass, PassContext
from .common import MOVES

_BYTE_CODES = (np.dtype(np.uint8), np.dtype(np.int8))


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's output, else None."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Constant":
        tensor = producer.attrs.get("value")
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _scalar(tensor: gs.Tensor) -> np.ndarray | None:
    """A rank-0 float constant (a rank-1 size-1 one would broadcast a rank: left alone)."""
    values = _constant(tensor) if not tensor.is_empty() else None
    return values if values is not None and values.ndim == 0 and np.issubdtype(values.dtype, np.floating) else None


def _power_of_two_factor(mul: gs.Node) -> tuple[int, float] | None:
    """(index of the tensor input, factor) when a Mul multiplies by a positive power of two."""
    for i in (0, 1):
        value = _scalar(mul.inputs[1 - i])
        if value is not None and value > 0 and math.frexp(float(value))[0] == 0.5:
            return i, float(value)
    return None


def _byte_codes(quantize: gs.Node) -> bool:
    """8-bit containers: onnxruntime moves no 4-bit (``qdq`` format) tensors."""
    zero = _constant(quantize.inputs[2]) if len(quantize.inputs) > 2 else None
    return zero is not None and zero.dtype in _BYTE_CODES


def _per_tensor(node: gs.Node) -> bool:
    """A QuantizeLinear with one scale, or a Clip with constant scalar bounds."""
    if node.op == "QuantizeLinear":
        return _scalar(node.inputs[1]) is not None
    return node.op == "Clip" and len(node.inputs) == 3 and all(_scalar(t) is not None for t in node.inputs[1:])


def _swap(move: gs.Node, node: gs.Node) -> None:
    """x -> move -> node -> y  becomes  x -> node -> move -> y."""
    moved = gs.Variable(f"{node.name}/above_{move.name}", dtype=node.outputs[0].dtype)
    x, y = move.inputs[0], list(node.outputs)
    move.inputs[0] = moved
    node.inputs[0] = x
    node.outputs = [moved]
    move.outputs = y


def _divided(tensor: gs.Tensor, factor: float) -> gs.Constant:
    value = _scalar(tensor)  # a power-of-two factor divides exactly, in the constant's own type
    return gs.Constant(f"{tensor.name}_over_{factor:g}", np.asarray(value / value.dtype.type(factor), value.dtype))


def _absorb_mul(mul: gs.Node, node: gs.Node) -> bool:
    """Fold a Mul by 2^n into the QuantizeLinear's scale, or move it after the Clip."""
    found = _power_of_two_factor(mul)
    if found is None:
        return False
    i, factor = found
    if node.op == "QuantizeLinear":
        node.inputs[0], node.inputs[1] = mul.inputs[i], _divided(node.inputs[1], factor)
        mul.inputs.clear()  # dead: nothing reads it now
        mul.outputs.clear()
        return True
    node.inputs[1], node.inputs[2] = _divided(node.inputs[1], factor), _divided(node.inputs[2], factor)
    mul.inputs = [mul.inputs[i], mul.inputs[1 - i]]  # the tensor first, for _swap
    _swap(mul, node)
    return True


def _hoist(graph: gs.Graph, node: gs.Node, kept: set[str], merge: bool) -> bool:
    """Move ``node`` (a QuantizeLinear or Clip) one op up if it can; True if it did."""
    x = node.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or len(x.outputs) != 1 or x.name in kept:
        return False
    if producer.op in MOVES and _per_tensor(node) and (node.op == "Clip" or _byte_codes(node)):
        _swap(producer, node)
        return True
    if producer.op == "Mul" and _per_tensor(node):
        return _absorb_mul(producer, node)
    if node.op != "QuantizeLinear" or not _byte_codes(node):
        return False
    scale, perm = _constant(node.inputs[1]), producer.attrs.get("perm")
    if producer.op == "Transpose" and perm is not None and scale is not None and scale.ndim == 1:
        node.attrs["axis"] = perm[node.attrs.get("axis", 1)]
        _swap(producer, node)
        return True
    return merge and producer.op == "Split" and _merge_split(graph, producer, kept)


def _merge_split(graph: gs.Graph, split: gs.Node, kept: set[str]) -> bool:
    """One per-axis QuantizeLinear before a Split whose every output is only quantized, alike."""
    quantizers = []
    for out in split.outputs:
        q = out.outputs[0] if len(out.outputs) == 1 and out.name not in kept else None
        if q is None or q.op != "QuantizeLinear" or not _byte_codes(q) or not _per_tensor(q):
            return False
        quantizers.append(q)
    sizes = _constant(split.inputs[1]) if len(split.inputs) > 1 else None
    zeros = [_constant(q.inputs[2]) for q in quantizers]
    if len(quantizers) < 2 or sizes is None or len({z.dtype for z in zeros}) != 1:
        return False
    scale = np.repeat([_scalar(q.inputs[1]) for q in quantizers], sizes).astype(np.float32)
    zero = np.repeat(zeros, sizes).astype(zeros[0].dtype)
    names = [q.name.removesuffix("_q") for q in quantizers]
    common = os.path.commonprefix(names)
    name = common + "_".join(n[len(common):] for n in names)  # e.g. blocks.0.attn/q_k_v
    codes = gs.Variable(f"{name}_codes", dtype=quantizers[0].outputs[0].dtype)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{name}_q", attrs={"axis": split.attrs.get("axis", 0)},
                               inputs=[split.inputs[0], gs.Constant(f"{name}_scale", scale),
                                       gs.Constant(f"{name}_zero_point", zero)], outputs=[codes]))
    outputs = [q.outputs[0] for q in quantizers]
    for q in quantizers:  # dead: their codes now come out of the Split
        q.inputs.clear()
        q.outputs.clear()
    split.inputs[0] = codes
    split.outputs = outputs
    return True


class HoistQuantize(Pass):
    """Moves every QuantizeLinear and Clip it can above data movement (module docstring)."""

    name = "hoist_quantize"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        kept = {t.name for t in graph.outputs}  # graph outputs keep their producers
        merge = format_spec(ctx.format).merged_qkv
        moved = True
        while moved:  # one sweep per op a node climbs: a few, each linear in the graph
            moved = False
            for node in list(graph.nodes):
                if node.op in ("QuantizeLinear", "Clip") and node.outputs and node.inputs:
                    moved = _hoist(graph, node, kept, merge) or moved
