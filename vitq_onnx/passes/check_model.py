"""Last pass: the ONNX checker and shape inference, so Netron shows every tensor's shape."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..errors import VitqError
from .base import Pass, PassContext, to_model


class CheckModel(Pass):
    name = "check_model"

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        model = to_model(graph.cleanup().toposort())
        try:
            onnx.checker.check_model(model)
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise VitqError(f"the rewritten graph is not valid ONNX: {str(exc).splitlines()[0]}") from None
        return gs.import_onnx(model)
