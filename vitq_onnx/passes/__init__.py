"""ONNX graph passes: one module per rewrite, run in order by ``run_passes``."""

from __future__ import annotations

from ..recipe import Recipe
from .base import Pass, PassContext, run_passes
from .check_model import CheckModel
from .factor_scales import FactorScales
from .fold_reparam import FoldReparam
from .insert_qdq import InsertQDQ
from .log2_softmax import Log2Softmax
from .lower_integer import LowerInteger
from .name_nodes import NameNodes
from .param_storage import RoundParams, StoreFloat16
from .quantize_weights import QuantizeWeights

FORMATS = ("ort", "qdq")


def pipeline(recipe: Recipe, fmt: str = "ort") -> list[Pass]:
    """The passes a recipe needs, in order, for output format ``fmt``."""
    passes: list[Pass] = [NameNodes()]
    if recipe.reparams:
        passes.append(FoldReparam())
    passes += [QuantizeWeights()]
    if recipe.param_storage:
        passes.append(RoundParams())
    passes.append(InsertQDQ())
    if any(a.kind == "log2" for a in recipe.activations.values()):
        passes.append(Log2Softmax())
    passes += [LowerInteger() if fmt == "ort" else FactorScales(), StoreFloat16()]
    passes.append(CheckModel())
    return passes


__all__ = ["FORMATS", "Pass", "PassContext", "pipeline", "run_passes"]
