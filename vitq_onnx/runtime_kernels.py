"""onnxruntime's own float kernels (LayerNorm, Softmax, LogSoftmax, Gelu; MatMul and Conv of the
layers kept float) on torch tensors.

The simulation must round every activation to the same code the exported model does; at 4 bits
one last-bit difference moves a code and the change spreads through the network. Integer
matmuls and IEEE add/mul/div already agree bit for bit, but LayerNorm, (Log)Softmax and GELU are
implemented differently in PyTorch and onnxruntime. So the simulation evaluates exactly those ops
with onnxruntime's kernels, in one-node models, and the exported graph keeps them as fast native
float32 ops (LogSoftmax feeds the log2 quantizer, which saves a Log).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

OPSET = 21


@cache
def _session(op: str, n_inputs: int, attrs: tuple) -> ort.InferenceSession:
    names = [f"x{i}" for i in range(n_inputs)]
    if op == "Linear":  # MatMul then Add, as exported: onnxruntime may fuse the pair (into Gemm for 2-D x)
        nodes = [helper.make_node("MatMul", names[:2], ["xw"]), helper.make_node("Add", ["xw", names[2]], ["y"])]
    else:
        nodes = [helper.make_node(op, names, ["y"], **dict(attrs))]
    graph = helper.make_graph(
        nodes, op, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(op: str, *inputs: torch.Tensor, **attrs) -> torch.Tensor:
    """``op`` applied by onnxruntime's CPU kernel to float32 tensors."""
    sess = _session(op, len(inputs), tuple(sorted(attrs.items())))
    feeds = {f"x{i}": np.ascontiguousarray(t.detach().float().cpu().numpy()) for i, t in enumerate(inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if bias is None:
        bias = torch.zeros_like(weight)
    return run("LayerNormalization", x, weight, bias, axis=-1, epsilon=float(np.float32(eps)))


def softmax(x: torch.Tensor) -> torch.Tensor:
    return run("Softmax", x, axis=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return run("Gelu", x)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return run("LogSoftmax", x, axis=-1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return run("MatMul", a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear as the exported graph has it: MatMul on the [in, out] weight, then Add of the bias."""
    return run("MatMul", x, weight.t()) if bias is None else run("Linear", x, weight.t(), bias)


def conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return run("Conv", *inputs, strides=tuple(stride), pads=tuple(padding) * 2, dilations=tuple(dilation),
               group=groups)
