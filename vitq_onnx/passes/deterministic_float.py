"""LayerNormalization, Softmax and Gelu rewritten as the float64 op sequences of ``float_ops``.

With every matmul integer (``lower_integer``), these are the only ops whose last bits could
differ between onnxruntime and the PyTorch simulation; after this pass they cannot.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import float_ops
from ..errors import VitqError
from .base import OpBuilder, Pass, PassContext

DOUBLE, FLOAT = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT


def _last_axis(node: gs.Node, rank: int | None) -> None:
    axis = node.attrs.get("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        raise VitqError(f"{node.name}: only last-axis {node.op} is supported")


def _layer_norm(s: OpBuilder, node: gs.Node, out: gs.Variable) -> None:
    x, gamma = node.inputs[0], node.inputs[1]
    last = s.const("last_axis", [-1], np.int64)
    xd = s.op("Cast", "x_f64", [x], to=DOUBLE)
    d = s.op("Sub", "centered", [xd, s.op("ReduceMean", "mean", [xd, last], keepdims=1)])
    var = s.op("ReduceMean", "variance", [s.op("Mul", "squared", [d, d]), last], keepdims=1)
    eps = s.const("epsilon", float(np.float32(node.attrs.get("epsilon", 1e-5))))
    n = s.op("Div", "normalized_f64", [d, s.op("Sqrt", "std", [s.op("Add", "var_eps", [var, eps])])])
    y = s.op("Mul", "scaled", [s.op("Cast", "normalized", [n], to=FLOAT), gamma],
             out=out if len(node.inputs) < 3 else None)
    if len(node.inputs) > 2:
        s.op("Add", "shifted", [y, node.inputs[2]], out=out)


def _softmax(s: OpBuilder, node: gs.Node, out: gs.Variable) -> None:
    last = s.const("last_axis", [-1], np.int64)
    xd = s.op("Cast", "x_f64", [node.inputs[0]], to=DOUBLE)
    e = s.op("Exp", "exp", [s.op("Sub", "shifted", [xd, s.op("ReduceMax", "max", [xd, last], keepdims=1)])])
    p = s.op("Div", "probs_f64", [e, s.op("ReduceSum", "sum", [e, last], keepdims=1)])
    s.op("Cast", "probs", [p], out=out, to=FLOAT)


def _gelu(s: OpBuilder, node: gs.Node, out: gs.Variable) -> None:
    if node.attrs.get("approximate", "none") not in ("none", b"none"):
        raise VitqError(f"{node.name}: only exact (erf) GELU is supported")
    xd = s.op("Cast", "x_f64", [node.inputs[0]], to=DOUBLE)
    u = s.op("Mul", "u", [xd, s.const("inv_sqrt2", float_ops.INV_SQRT2)])
    a = s.op("Abs", "abs_u", [u])
    t = s.op("Div", "t", [s.const("one", 1.0), s.op("Add", "pa_1", [s.op("Mul", "pa", [a, s.const("p", float_ops.ERF_P)]),
                                                              s.const("one_b", 1.0)])])
    poly = s.op("Mul", "poly4", [t, s.const("coef5", float_ops.ERF_A[4])])
    for i in (3, 2, 1, 0):
        poly = s.op("Mul", f"poly{i}", [s.op("Add", f"poly{i}_add", [poly, s.const(f"coef{i + 1}", float_ops.ERF_A[i])]), t])
    decay = s.op("Exp", "exp", [s.op("Neg", "neg_a2", [s.op("Mul", "a_squared", [a, a])])])
    erf_abs = s.op("Sub", "erf_abs", [s.const("one_c", 1.0), s.op("Mul", "tail", [poly, decay])])
    erf = s.op("Mul", "erf", [s.op("Sign", "sign", [u]), erf_abs])
    y = s.op("Mul", "gelu_f64", [s.op("Mul", "half_x", [xd, s.const("half", 0.5)]),
                                 s.op("Add", "erf_1", [erf, s.const("one_d", 1.0)])])
    s.op("Cast", "gelu", [y], out=out, to=FLOAT)


_REWRITES = {"LayerNormalization": _layer_norm, "Softmax": _softmax, "Gelu": _gelu}


class DeterministicFloat(Pass):
    name = "deterministic_float"

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        for node in [n for n in graph.nodes if n.op in _REWRITES]:
            x = node.inputs[0]
            if node.op != "Gelu":
                _last_axis(node, len(x.shape) if x.shape is not None else None)
            out = node.outputs[0]
            node.outputs.clear()
            _REWRITES[node.op](OpBuilder(graph, node.name), node, out)
