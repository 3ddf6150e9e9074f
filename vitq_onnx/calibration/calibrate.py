"""Calibration: turn a timm model and calibration images into a recipe by running a method's stages.

The model is copied and instrumented with quant points (``quant_points.py``); each stage of the
method (``methods.py``, ``stages.py``, ``reconstruct.py``) reads and extends the shared state, and
the recipe it leaves is the seam to the ONNX passes.
"""

from __future__ import annotations

import copy
import re
import time

import numpy as np
import torch

from ..errors import VitqError
from ..families import supported
from ..progress import StageTimes
from ..recipe import Recipe
from .act_matmuls import unquantized_matmuls
from .simulation import folded, load_quantized
from .bits import BitWidths
from .methods import Method
from .quant_points import instrument, keeps_float
from .stages import Stage, quantize_as_recipe
from .state import CalibOptions, CalibState

# what every model keeps float (ViT's and Swin V1's pieces); a family adds its own (Family.float_ops)
FLOAT_OPS = [
    "LayerNormalization", "Softmax (input side)", "GELU", "residual Add", "Linear/Conv bias Add",
    "q*scale Mul", "cls token / position embedding", "Swin relative position bias and mask",
]


def calibrate(model: torch.nn.Module, images: np.ndarray, bits: BitWidths, method: Method, model_name: str,
              options: CalibOptions = CalibOptions()) -> Recipe:
    """Run ``method``'s stages on a copy of ``model``; the recipe of what they fitted."""
    torch.manual_seed(options.seed)
    device = _device(options.device)
    work = copy.deepcopy(model).eval().to(device)
    inst = instrument(work, bits.keep_float)
    unmatched = bits.unmatched(list(inst.points) + list(inst.weights))
    if unmatched:
        raise VitqError(f"--layer-bits pattern '{unmatched[0]}' matches no quantized layer of {model_name}")
    floats = [*inst.float_layers, *inst.float_matmuls, *_uninstrumented_matmuls(work, images[:1], bits, device)]
    for pattern in bits.keep_float:
        if not any(keeps_float(name, [pattern]) for name in floats):
            raise VitqError(f"--keep-float pattern '{pattern}' matches no Linear, Conv or attention module "
                            f"of {model_name} (names as in model.named_modules(), e.g. blocks.0.mlp.fc1)")
    if not inst.points:
        raise VitqError("--keep-float keeps every layer float: nothing is left to quantize")
    recipe = Recipe(model=model_name, method=method.name, w_bits=bits.w, a_bits=bits.a,
                    keep_float=list(bits.keep_float), float_layers=floats,
                    float_ops=FLOAT_OPS + inst.float_ops(), info={"num_calib": int(len(images)), "bits": bits.to_dict(),
                                                     "seed": options.seed})
    state = CalibState(model, work, inst, torch.from_numpy(images).to(device), bits, recipe, options)
    _run_stages(state, method.stages)
    missing = set(inst.points) - set(recipe.activations)
    if missing:
        raise RuntimeError(f"quant points never reached during calibration: {sorted(missing)[:3]}")
    recipe.param_storage = param_storage(work, inst)
    return recipe


def _uninstrumented_matmuls(work: torch.nn.Module, image: np.ndarray, bits: BitWidths, device) -> list[str]:
    """The modules that multiply two activations where no family quantizes them, each kept float by
    a --keep-float pattern; one clear error for the first that is not (act_matmuls.py)."""
    found = unquantized_matmuls(work, torch.from_numpy(image).to(device))
    refused = [(path, cls) for path, cls in found.items() if not keeps_float(path, bits.keep_float)]
    if refused:
        path, cls = refused[0]
        alike = [p for p, c in refused if c == cls]
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path) if len(alike) > 1 else path
        raise VitqError(f"{cls} at '{path or 'the model'}'{f' (and {len(alike) - 1} more)' if len(alike) > 1 else ''} "
                        f"multiplies two activations where no family quantizes them (its matmuls would stay "
                        f"float32): supported families: {supported()}; --keep-float '{pattern or '<module>'}' "
                        "keeps them float on purpose")
    return list(found)


def refine(model: torch.nn.Module, recipe: Recipe, images: np.ndarray, stages: tuple[Stage, ...],
           options: CalibOptions = CalibOptions()) -> Recipe:
    """Run ``stages`` (e.g. a search) on the quantized model an earlier recipe describes, without
    calibrating again: the state is rebuilt from the recipe (its folds, weights, bias corrections
    and quantizers), so the model computes what the recipe's calibration left. A new recipe."""
    torch.manual_seed(options.seed)
    device = _device(options.device)
    recipe = copy.deepcopy(recipe)
    work, inst = folded(model, recipe)
    work.to(device)
    bits = recipe.info.get("bits", {"w": recipe.w_bits, "a": recipe.a_bits})
    bits = BitWidths.parse(f"{bits['w']}/{bits['a']}", bits.get("layers", ()), recipe.keep_float)
    state = CalibState(model, work, inst, torch.from_numpy(images).to(device), bits, recipe, options)
    state.keep_float_reference()  # the folded float weights and biases, as calibration recorded them
    load_quantized(inst, recipe)
    for point in inst.points.values():
        quantize_as_recipe(state, point)
    _run_stages(state, stages)
    return recipe


def _run_stages(state: CalibState, stages: tuple[Stage, ...]) -> None:
    """Each stage in turn. Under a deadline (--time-budget) each optimizing stage (one with
    ``iters``) gets the time left in proportion to its iterations among those still to run."""
    times = state.options.times if state.options.times is not None else StageTimes()
    for i, stage in enumerate(stages, 1):
        step = f"calibration {i}/{len(stages)}"
        deadline = state.options.deadline
        if deadline is not None and hasattr(stage, "iters"):
            share = stage.iters / sum(s.iters for s in stages[i - 1:] if hasattr(s, "iters"))
            state.stage_deadline = time.time() + max(0.0, deadline - time.time()) * share
        state.say(f"{step}: {stage.describe(state)}")
        with times(f"{step}: {stage.name}"):
            stage.run(state)
        state.say(f"{step}: {stage.name} done in {times[f'{step}: {stage.name}']:.1f} s")


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitqError(f"--device {name}: torch sees no CUDA GPU on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise VitqError(f"unknown --device '{name}': use cpu or cuda[:N]") from None


def param_storage(model: torch.nn.Module, inst) -> dict[str, str]:
    """How each float parameter/buffer that is not a quantized weight is stored: embedding
    tables (2-D and up) as int8 per channel, the rest (biases, LayerNorm) as float16 values;
    the layers kept float keep their float32 weights and biases."""
    quantized = {id(mod.weight) for mod in inst.weights.values()}
    quantized |= {id(t) for mod in inst.float_layers.values() for t in mod.parameters()}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: "int8" if t.squeeze().dim() >= 2 else "float16"
            for name, t in sorted(tensors, key=lambda nt: nt[0]) if t.is_floating_point() and id(t) not in quantized}
