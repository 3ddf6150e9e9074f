"""Calibration: turn a timm model and calibration images into a recipe.

1. (channel-wise methods) one FP pass records each post-LayerNorm Linear input; per-channel
   ranges become RepQ-ViT reparameterizations folded into the model.
2. Weights (after the fold) get per-output-channel symmetric scales.
3. One pass over the calibration batch with quantized weights fits each activation quantizer on
   its first sight and quantizes from then on, so every layer is calibrated on the inputs the
   quantized layers before it produce. There each Linear's weight scales are refit against its
   (quantized) input, weighting each input channel by its mean square so the search minimizes
   the layer's output error, and the bias absorbs the mean output shift that weight rounding
   causes (bias correction, Nagel et al. 2019).
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
from tqdm import tqdm

from ..recipe import ActQuant, Recipe, WeightQuant, split_key, tensor_key
from . import quantizers as Q
from .methods import Method
from .quant_points import instrument
from .reparam import channelwise_reparam, fold_into_torch

STEM_BITS = 8  # the image input to the patch embedding stays 8-bit, as in the papers
FLOAT_OPS = [
    "LayerNormalization", "Softmax (input side)", "GELU", "residual Add", "Linear/Conv bias Add",
    "q*scale Mul", "cls token / position embedding", "Swin relative position bias and mask",
]


def _act(kind: str, bits: int, scale, zero_point) -> ActQuant:
    return ActQuant(kind, bits, np.asarray(scale, np.float32).reshape(()),
                    np.asarray(zero_point, np.float32).reshape(()).astype(np.int32))


def fake_act(q: ActQuant, x: torch.Tensor) -> torch.Tensor:
    scale = torch.from_numpy(np.asarray(q.scale, np.float32))
    if q.kind == "log2":
        return Q.fake_log2(x, scale, q.bits)
    return Q.fake_uniform(x, scale, torch.from_numpy(np.asarray(q.zero_point, np.float32)), q.bits)


@torch.no_grad()
def calibrate(model: torch.nn.Module, images: np.ndarray, w_bits: int, a_bits: int,
              method: Method, model_name: str, progress: bool = True) -> Recipe:
    model = copy.deepcopy(model).eval()
    inst = instrument(model)
    batch = torch.from_numpy(images)
    recipe = Recipe(model=model_name, method=method.name, w_bits=w_bits, a_bits=a_bits,
                    float_ops=list(FLOAT_OPS), info={"num_calib": int(len(images))})
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)

    if method.channelwise_post_norm:
        say(f"calibration 1/3: channel-wise post-LayerNorm ranges ({len(inst.post_norm)} norms)")
        seen: dict[str, torch.Tensor] = {}
        keys = {f"{lins[0]}:0" for _, _, lins, _ in inst.post_norm}

        def record(point, x):
            seen[point.key] = x
            return x

        inst.set_action(record, keys)
        model(batch)
        inst.set_action(None)
        for norm_node, norm, lin_nodes, linears in inst.post_norm:
            rep, scale, zp = channelwise_reparam(seen[f"{lin_nodes[0]}:0"], a_bits, norm_node, lin_nodes)
            fold_into_torch(norm, linears, rep)
            recipe.reparams.append(rep)
            for lin in lin_nodes:
                recipe.activations[f"{lin}:0"] = _act("uniform", a_bits, scale, zp)
        seen.clear()

    say(f"calibration 2/3: weights ({len(inst.weights)} layers, {w_bits} bits)")
    fp_weights = {key: mod.weight.detach().clone() for key, mod in inst.weights.items()}

    def set_weight(key, importance=None):
        mod, w = inst.weights[key], fp_weights[key]
        scale = Q.fit_weight(w, w_bits, importance)
        mod.weight.copy_(Q.fake_weight(w, scale, w_bits))
        recipe.weights[key] = WeightQuant(w_bits, scale.numpy().astype(np.float32))

    for key in inst.weights:
        set_weight(key)

    def refit_linear(node: str, x: torch.Tensor) -> None:
        """Weight scales weighted by the input's energy per channel, then bias correction."""
        key = tensor_key(node, 1)
        set_weight(key, x.pow(2).mean(0))
        mod = inst.weights[key]
        if mod.bias is not None:
            delta = (fp_weights[key] - mod.weight) @ x.mean(0)
            mod.bias.add_(delta)
            recipe.bias_corrections[node] = delta.numpy().astype(np.float32)

    bar = tqdm(total=len(inst.points), desc="calibration 3/3: activations", disable=not progress,
               file=sys.stderr, unit="tensor")

    def fit_then_quantize(point, x):
        if point.key not in recipe.activations:
            if point.role == "softmax" and method.log2_softmax(a_bits):
                recipe.activations[point.key] = _act("log2", a_bits, Q.fit_log2(x, a_bits, point.partner), 0)
            else:
                bits = STEM_BITS if point.role == "conv_input" else a_bits
                scale, zp = Q.fit_uniform(x, bits, unsigned=point.role == "softmax")
                recipe.activations[point.key] = _act("uniform", bits, scale, zp)
        bar.update(1)
        point.action = lambda p, t: fake_act(recipe.activations[p.key], t)
        xq = point.action(point, x)
        if point.role == "linear_input":
            refit_linear(split_key(point.key)[0], xq.reshape(-1, xq.shape[-1]))
        return xq

    inst.set_action(fit_then_quantize)
    model(batch)
    bar.close()
    missing = set(inst.points) - set(recipe.activations)
    if missing:
        raise RuntimeError(f"quant points never reached during calibration: {sorted(missing)[:3]}")
    recipe.param_storage = param_storage(model, inst)
    return recipe


def param_storage(model: torch.nn.Module, inst) -> dict[str, str]:
    """How each float parameter/buffer that is not a quantized weight is stored: embedding
    tables (2-D and up) as int8 per channel, the rest (biases, LayerNorm) as float16 values."""
    quantized = {id(mod.weight) for mod in inst.weights.values()}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: "int8" if t.squeeze().dim() >= 2 else "float16"
            for name, t in sorted(tensors, key=lambda nt: nt[0]) if t.is_floating_point() and id(t) not in quantized}
