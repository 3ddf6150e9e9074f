"""Lower a recipe to ONNX: the model's FP32 graph, then the passes the recipe needs."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from .. import runtime
from ..fp32 import export_fp32
from ..images import Preprocess
from ..passes import PassContext, pipeline, run_passes
from ..progress import StageTimes
from ..recipe import Recipe


def lower(model: torch.nn.Module, recipe: Recipe, preprocess: Preprocess, fmt: str, target_cpu: str,
          save_passes: Path | None, progress: bool, times: StageTimes) -> onnx.ModelProto:
    """The quantized graph of ``recipe`` (its ``param_storage`` trimmed to the graph's parameters)."""
    with times("FP32 ONNX export"):
        fp32 = export_fp32(model, preprocess.size)
    stored = {init.name for init in fp32.graph.initializer}  # parameters the exporter folded away stay float32
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    runtime.set_metadata(fp32, runtime.META_PREPROCESS, preprocess.to_dict())
    with times("ONNX passes"):
        return run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt, target_cpu), save_passes, progress)
