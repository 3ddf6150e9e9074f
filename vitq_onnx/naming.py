"""Canonical names shared by calibration (torch modules) and passes (ONNX nodes).

The ``name_nodes`` pass renames every exported node to ``<module path>/<op>``; calibration
addresses tensors by those names, so a recipe key reads the same in PyTorch and in Netron.
"""

QK = "matmul_qk"  # q*scale @ k^T
AV = "matmul_av"  # softmax(...) @ v


def linear_node(module: str) -> str:
    return f"{module}/MatMul"


def conv_node(module: str) -> str:
    return f"{module}/Conv"


def norm_node(module: str) -> str:
    return f"{module}/LayerNormalization"


def attention_nodes(module: str) -> tuple[str, str]:
    return f"{module}/{QK}", f"{module}/{AV}"



_ATTENTION_INPUTS = {(QK, 0): "q", (QK, 1): "k", (AV, 0): "attn", (AV, 1): "v"}


def tensor_label(node: str, index: int) -> str:
    """Readable prefix for the nodes that quantize input ``index`` of ``node``.

    ``blocks.3.attn.qkv/MatMul`` input 0 -> ``blocks.3.attn.qkv/input``, input 1 -> ``.../weight``;
    ``blocks.3.attn/matmul_av`` input 0 -> ``blocks.3.attn/attn``.
    """
    module, _, op = node.rpartition("/")
    if (op, index) in _ATTENTION_INPUTS:
        return f"{module}/{_ATTENTION_INPUTS[(op, index)]}"
    return f"{module}/{'input' if index == 0 else 'weight'}"
