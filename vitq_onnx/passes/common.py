"""What several passes share: reading codes and scales back from the graph, Linear layers in
canonical form (MatMul on a [in, out] weight, then Add of a bias), and code containers.

One module, so that no pass imports a sibling pass for a helper.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from ..formats import format_spec


MOVES = ("Transpose", "Squeeze", "Unsqueeze", "Reshape")  # ops that only move elements
CODE_MOVES = (*MOVES, "Split")  # a code tensor's values come from its input's
CODE_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
               np.dtype(ml_dtypes.uint4): (0, 15), np.dtype(ml_dtypes.int4): (-8, 7)}


def code_range(tensor: gs.Tensor, dtype: np.dtype) -> tuple[int, int]:
    """The smallest and largest code ``tensor`` (of integer type ``dtype``) can hold."""
    lo, hi = CODE_RANGES[np.dtype(dtype)]
    if isinstance(tensor, gs.Constant):
        return int(tensor.values.min()), int(tensor.values.max())
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Cast" and _dtype_of(producer.inputs[0]) in CODE_RANGES:
        a, b = code_range(producer.inputs[0], _dtype_of(producer.inputs[0]))  # e.g. 4-bit codes widened
        return max(lo, a), min(hi, b)
    if producer is not None and producer.op in CODE_MOVES:
        return code_range(producer.inputs[0], dtype)
    if producer is not None and producer.op == "Gather" and isinstance(producer.inputs[0], gs.Constant):
        table = producer.inputs[0].values  # a lookup table's entries (post-Softmax digits)
        return max(lo, int(table.min())), min(hi, int(table.max()))
    if producer is not None and producer.op == "QuantizeLinear":
        x, scale, zero = producer.inputs[:3]
        clip = x.inputs[0] if x.inputs else None
        if clip is not None and clip.op == "Clip" and all(isinstance(t, gs.Constant) for t in clip.inputs[1:3]) \
                and scale.values.size == 1:
            s, z = float(scale.values), int(zero.values)
            a, b = (int(np.rint(float(t.values) / s)) + z for t in clip.inputs[1:3])
            return max(lo, a), min(hi, b)
    return lo, hi


def _dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    if tensor.dtype is not None:
        return np.dtype(tensor.dtype)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "QuantizeLinear":  # its type is its zero point's
        return np.dtype(producer.inputs[2].values.dtype)
    if producer is not None and producer.op in CODE_MOVES:
        return _dtype_of(producer.inputs[0])
    return None


def dequantize_input(tensor: gs.Tensor):
    """(codes, scale, zero point) when ``tensor`` comes straight from a DequantizeLinear."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "DequantizeLinear" or not isinstance(node.inputs[1], gs.Constant):
        return None
    return node.inputs[0], node.inputs[1].values.astype(np.float32), node.inputs[2]


def scalar_zero_point(zp: gs.Constant, name: str) -> gs.Constant:
    """Per-channel zero points that are all equal (ours always are) as one scalar."""
    values = zp.values.reshape(-1)
    if not (values == values[0]).all():
        raise ValueError(f"{name}: per-channel zero points differ")
    return gs.Constant(f"{name}_zp", np.array(values[0], dtype=values.dtype))


def scale_product(graph: gs.Graph, module: str, scale_a: np.ndarray, scale_b: np.ndarray, shape) -> gs.Variable:
    """scale_a * scale_b as a Mul of two constants: the same float32 product the simulation takes,
    folded by onnxruntime at load, while the per-channel scales stay storable as float16."""
    out = gs.Variable(f"{module}/scale_ab", dtype=np.float32)
    graph.nodes.append(gs.Node("Mul", f"{module}/scale_ab", outputs=[out], inputs=[
        gs.Constant(f"{module}/scale_a", np.asarray(scale_a, np.float32).reshape(())),
        gs.Constant(f"{module}/scale_b", np.asarray(scale_b, np.float32).reshape(shape))]))
    return out


def conv_bias_split(node: gs.Node) -> gs.Constant | None:
    """Detach a Conv's bias input, returned shaped [1, C, 1, 1] to be added after the scale."""
    if len(node.inputs) < 3:
        return None
    bias = node.inputs.pop(2)
    return gs.Constant(f"{bias.name}_nchw", bias.values.reshape(1, -1, 1, 1))


def quantized_products(graph: gs.Graph):
    """(node, module, a, b) for each MatMul/Conv whose inputs both come from DequantizeLinear
    (a per tensor); ``module`` names what replaces it: blocks.0.attn.qkv/MatMul -> blocks.0.attn.qkv,
    while attention matmuls keep their own name (blocks.0.attn/matmul_qk)."""
    for node in [n for n in graph.nodes if n.op in ("MatMul", "Conv")]:
        a, b = (dequantize_input(t) for t in node.inputs[:2])
        if a is not None and b is not None and a[1].size == 1:
            yield node, node.name.removesuffix("/" + node.op), a, b


def packed_type(bits: int, fmt: str, signed: bool, weights: bool = False):
    """<= 4-bit tensors as ONNX int4/uint4 (ml_dtypes arrays) where the format packs them (``qdq``;
    ``openvino`` only weights), else None: an 8-bit container."""
    spec = format_spec(fmt)
    if bits <= 4 and (spec.int4_weights if weights else spec.int4_activations):
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    return None


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
