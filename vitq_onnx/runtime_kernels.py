"""onnxruntime's own float kernels (LayerNorm, Softmax, LogSoftmax, Gelu, Sigmoid, ReduceL2, ReduceMean; MatMul and Conv
of the layers kept float) on torch tensors.

The simulation must round every activation to the same code the exported model does; at 4 bits
one last-bit difference moves a code and the change spreads through the network. Integer
matmuls and IEEE add/mul/div already agree bit for bit, but LayerNorm, (Log)Softmax, GELU and the
L2 norm of ``F.normalize`` and a pooled head's mean are implemented differently in PyTorch and onnxruntime. So the
simulation evaluates exactly those ops with onnxruntime's kernels, in one-node models, and the
exported graph keeps them as fast native float32 ops (LogSoftmax feeds the log2 quantizer, which
saves a Log).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


@cache
def _session(op: str, n_inputs: int, attrs: tuple) -> ort.InferenceSession:
    names = [f"x{i}" for i in range(n_inputs)]
    node = helper.make_node(op, names, ["y"], **dict(attrs))
    return _load([node], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names], [])


def _load(nodes, inputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "kernel", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
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


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return (run("Gelu", x) if approximate == "none" else run("Gelu", x, approximate=approximate)).to(x.device)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return run("Sigmoid", x).to(x.device)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return run("LogSoftmax", x, axis=-1)


@cache
def _reduce(op: str, axes: tuple[int, ...], keepdims: bool) -> ort.InferenceSession:
    node = helper.make_node(op, ["x0", "axes"], ["y"], keepdims=int(keepdims))
    return _load([node], [helper.make_tensor_value_info("x0", TensorProto.FLOAT, None)],
                 [numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")])


def _reduced(op: str, x: torch.Tensor, axes: tuple[int, ...], keepdims: bool) -> torch.Tensor:
    feed = np.ascontiguousarray(x.detach().float().cpu().numpy())
    return torch.from_numpy(_reduce(op, tuple(axes), keepdims).run(None, {"x0": feed})[0]).to(x.device)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` as its export computes it: onnxruntime's ReduceL2 (its sum of
    squares has other last bits than torch's norm), then Clip and Div (exact in both)."""
    return x / _reduced("ReduceL2", x, (-1,), True).clamp_min(eps).expand_as(x)


def reduce_mean(x: torch.Tensor, axes: tuple[int, ...], keepdims: bool = False) -> torch.Tensor:
    """``x.mean(axes)`` as its export computes it (ReduceMean: a pooled head's average has other
    last bits than torch's, and the head's input quantizer reads every one)."""
    return _reduced("ReduceMean", x, axes, keepdims)


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    return run("GlobalAveragePool", x).to(x.device)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return run("MatMul", a, b)


class FloatLayer:
    """A Linear or Conv2d kept float, as the exported graph runs it: its weight and bias are
    initializers (onnxruntime pre-packs a constant weight for another GEMM kernel than a weight
    fed at run time, with other last bits) and its input has the graph's shape (shape-dependent
    fusions, e.g. MatMul+Add into Gemm, apply alike). One session per input shape."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.sessions = module, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[1:])
        if shape not in self.sessions:
            self.sessions[shape] = self._session(shape)
        x = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.sessions[shape].run(None, {"x": x})[0])

    def _session(self, shape: tuple) -> ort.InferenceSession:
        mod = self.module
        bias = None if mod.bias is None else numpy_helper.from_array(mod.bias.detach().float().numpy(), "b")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])
        if isinstance(mod, torch.nn.Conv2d):
            w = numpy_helper.from_array(mod.weight.detach().float().numpy(), "w")
            node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"],
                                    strides=list(mod.stride), pads=list(mod.padding) * 2,
                                    dilations=list(mod.dilation), group=mod.groups)
            return _load([node], [x], [w] + ([bias] if bias else []))
        w = numpy_helper.from_array(np.ascontiguousarray(mod.weight.detach().float().numpy().T), "w")
        if bias is None:
            return _load([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [w])
        nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["b", "xw"], ["y"])]
        return _load(nodes, [x], [w, bias])
