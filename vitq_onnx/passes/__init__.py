"""ONNX graph passes: one module per rewrite, run in order by ``run_passes``. No torch here.

The activation quantizers' rewrites register themselves by kind (``deploy.py``); importing their
modules below registers them.
"""

from __future__ import annotations

from ..formats import FORMATS, format_spec
from ..recipe import Recipe
from . import insert_qdq, log2_softmax, log2_table_softmax, sulq_softmax  # noqa: F401  (register the rewrites)
from .base import Pass, PassContext, run_passes
from .check_model import CheckModel
from .deploy import deploy_passes
from .factor_scales import FactorScales
from .float_matmuls import CheckFloatMatmuls
from .fold_reparam import FoldReparam
from .hoist_quantize import HoistQuantize
from .lower_integer import LowerInteger
from .name_nodes import NameNodes
from .pair_bounds import CheckPairBounds
from .param_storage import RoundParams, StoreFloat16
from .quantize_weights import QuantizeWeights
from .unfused_norm import UnfusedNorm


def pipeline(recipe: Recipe, fmt: str = "ort") -> list[Pass]:
    """The passes a recipe needs, in order, for output format ``fmt``."""
    passes: list[Pass] = [NameNodes()]
    if recipe.reparams:
        passes.append(FoldReparam())
    passes += [QuantizeWeights()]
    if recipe.param_storage:
        passes.append(RoundParams())
    passes += deploy_passes(recipe.activations)  # each quantizer kind's registered rewrite
    passes += [HoistQuantize(), LowerInteger() if format_spec(fmt).ort_kernels else FactorScales(), StoreFloat16(), UnfusedNorm(), CheckPairBounds()]
    passes += [CheckFloatMatmuls(), CheckModel()]
    return passes


__all__ = ["FORMATS", "Pass", "PassContext", "pipeline", "run_passes"]
