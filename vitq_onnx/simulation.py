"""The PyTorch simulation of a recipe: the reference the exported ONNX model must match."""

from __future__ import annotations

import copy

import torch

from .calibration import quantizers as Q
from .calibration.calibrate import fake_act
from .calibration.quant_points import instrument
from .calibration.reparam import fold_into_torch
from .errors import VitqError
from .recipe import Recipe, tensor_key


@torch.no_grad()
def simulate(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """A copy of the FP model with the recipe's reparameterizations and fake quantization."""
    model = copy.deepcopy(model).eval()
    inst = instrument(model)
    expected = set(inst.points) | set(inst.weights)
    given = set(recipe.activations) | set(recipe.weights)
    if expected != given:
        extra, missing = sorted(given - expected), sorted(expected - given)
        raise VitqError(f"recipe does not fit this model: {len(missing)} tensors missing "
                        f"({missing[:1]}), {len(extra)} unknown ({extra[:1]})")
    norms = {node: (norm, linears) for node, norm, _, linears in inst.post_norm}
    for rep in recipe.reparams:
        if rep.norm not in norms:
            raise VitqError(f"recipe folds into {rep.norm}, which this model does not have")
        fold_into_torch(*norms[rep.norm], rep)
    for key, mod in inst.weights.items():
        q = recipe.weights[key]
        mod.weight.copy_(Q.fake_weight(mod.weight, torch.from_numpy(q.scale), q.bits))
    for node, delta in recipe.bias_corrections.items():
        inst.weights[tensor_key(node, 1)].bias.add_(torch.from_numpy(delta))
    inst.set_action(lambda point, x: fake_act(recipe.activations[point.key], x))
    return model
