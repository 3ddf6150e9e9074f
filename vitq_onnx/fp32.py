"""Export the FP32 timm model to ONNX: the graph every pass starts from.

The TorchScript exporter is used: it is fast, keeps Linear/LayerNorm/Softmax as single nodes and
names every node by its module scope, which the ``name_nodes`` pass turns into canonical names.
Attention is exported through its family's quant-point forward (timm's non-fused path), so it exposes
q, k, the softmax output and v.
"""

from __future__ import annotations

import copy
import io
import warnings

import onnx
import torch

from .calibration.quant_points import instrument

OPSET = 21
INPUT, OUTPUT = "image", "logits"


@torch.no_grad()
def export_fp32(model: torch.nn.Module, image_size: int) -> onnx.ModelProto:
    model = copy.deepcopy(model).eval()
    instrument(model)  # unfused attention; the points do nothing, so the graph is the FP model
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, image_size, image_size),), buffer, dynamo=False,
            opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())
