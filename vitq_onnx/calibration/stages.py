"""Calibration stages: each one step of a method, run in order on a shared ``CalibState``.

A stage has a ``name``, a one-line ``describe(state)`` and ``run(state)``; methods
(``methods.py``) are named lists of stages, so a new method composes these (and new ones) rather
than adding flags to one calibration loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..recipe import ActQuant, split_key, tensor_key
from .quantizers import get_kind, kind_for, torch_params
from .bits import module_of
from .quantizers.uniform import channel_stats, fit_uniform_rows
from .quantizers.weights import fit_weight
from .reparam import channelwise_reparam, fold_into_torch
from .state import CalibState


OPT_M_ROWS = 1024  # calibration rows OPT-m scores each candidate range on


class Stage:
    name = "stage"
    # its work besides any training steps, in float forwards of every calibration image (measured
    # on a 518-px ViT-S, 2 CPU cores): how --time-budget chooses how many images to calibrate on
    image_passes = 0.0

    def expected_forwards(self, images: int) -> float:
        """Its expected time, in float forwards of one image (``image_passes`` of each image)."""
        return self.image_passes * images

    def describe(self, state: CalibState) -> str:
        return self.name

    def run(self, state: CalibState) -> None:
        raise NotImplementedError


def set_activation(state: CalibState, key: str, kind: str, bits: int, params: dict) -> None:
    """Record a fitted quantizer in the recipe (numpy, as its kind stores it)."""
    state.recipe.activations[key] = ActQuant(kind, bits, get_kind(kind).to_numpy(params))


def quantize_as_recipe(state: CalibState, point) -> None:
    """From now on ``point`` quantizes with its recipe entry, as the deployed model does."""
    q = state.recipe.activations[point.key]
    params = torch_params(q, state.images.device)
    point.action = lambda p, t, kind=get_kind(q.kind): kind.fake(t, params, q.bits)


@torch.no_grad()
def post_norm_pairs(state: CalibState, stage: "Stage", max_rows: int = 2048):
    """Each LayerNorm -> Linear pair (norm node, norm, Linear nodes, Linears) with the
    ``channel_stats`` of the Linear's input, all recorded in one float pass first; a progress step
    for that pass and for each pair the caller has handled."""
    inst, seen = state.inst, {}

    def record(point, x):
        seen[point.key] = channel_stats(x, max_rows)
        return x

    bar = state.progress(len(inst.post_norm) + 1, f"calibration: {stage.describe(state)}", unit="step")
    inst.set_action(record, {tensor_key(lins[0], 0) for _, _, lins, _ in inst.post_norm})
    state.model(state.images)
    inst.set_action(None)
    bar.update(1)
    for norm_node, norm, lin_nodes, linears in inst.post_norm:
        yield norm_node, norm, lin_nodes, linears, seen.pop(tensor_key(lin_nodes[0], 0))
        bar.update(1)
    bar.close()


class ChannelwiseReparam(Stage):
    """RepQ-ViT: per-channel post-LayerNorm quantizers, folded into the LayerNorm and next Linear.

    One float pass records each post-LayerNorm Linear input's ``channel_stats`` (ranges and a row
    sample, not the tensor); its per-channel ranges become a reparameterization (``reparam.py``)
    that leaves a per-tensor quantizer with the same codes.
    """

    name = "channelwise_reparam"
    image_passes = 1.5

    def describe(self, state):
        return f"channel-wise post-LayerNorm ranges ({len(state.inst.post_norm)} norms)"

    @torch.no_grad()
    def run(self, state: CalibState) -> None:
        for norm_node, norm, lin_nodes, linears, stats in post_norm_pairs(state, self):
            bits = state.bits.act(tensor_key(lin_nodes[0], 0), "linear_input")
            rep, scale, zp = channelwise_reparam(stats, bits, norm_node, lin_nodes)
            fold_into_torch(norm, linears, rep)
            state.recipe.reparams.append(rep)
            for lin in lin_nodes:
                set_activation(state, tensor_key(lin, 0), "uniform", state.bits.act(tensor_key(lin, 0), "linear_input"),
                               {"scale": scale, "zero_point": zp})


class FitWeights(Stage):
    """Per-output-channel symmetric weight scales by MSE (refined later against real inputs)."""

    name = "fit_weights"

    def describe(self, state):
        widths = sorted({state.bits.weight(k) for k in state.inst.weights})
        return f"weights ({len(state.inst.weights)} layers, {'/'.join(map(str, widths))} bits)"

    @torch.no_grad()
    def run(self, state: CalibState) -> None:
        state.keep_float_reference()
        bar = state.progress(len(state.inst.weights), f"calibration: {self.describe(state)}", unit="layer")
        for key in state.inst.weights:  # fp_weights: as a float stage trained them, if one did
            state.set_weight(key, fit_weight(state.fp_weights[key], state.bits.weight(key)))
            bar.update(1)
        bar.close()


@dataclass
class FitActivations(Stage):
    """One pass over the calibration batch that fits each activation quantizer on first sight and
    quantizes from then on, so every layer is calibrated on what the quantized layers before it
    produce. Each Linear's weight scales are then refit weighting each input channel by its mean
    square (an estimate of the layer's output error), and the bias absorbs the mean output shift
    that weight rounding causes (bias correction, Nagel et al. 2019).

    ``softmax_kind(bits)`` names the quantizer kind of post-Softmax tensors; every other
    activation is uniform. Quantizers a previous stage fitted (channel-wise ones) are kept. With
    ``weights=False`` the weights stay float (I&S-ViT's first stage trains them so). With
    ``opt_m`` the input of each MLP's fc2 is ranged by fc2's output error instead of its own.
    """

    softmax_kind: Callable[[int], str] = lambda bits: "uniform"
    weights: bool = True
    opt_m: bool = False  # fc2 inputs (post-GELU) ranged by fc2's output error (MPTQ-ViT's OPT-m)
    name = "fit_activations"
    image_passes = 5.0

    def describe(self, state):
        return "activations" + ("" if self.weights else " (float weights)")

    @torch.no_grad()
    def run(self, state: CalibState) -> None:
        inst, recipe = state.inst, state.recipe
        bar = state.progress(len(inst.points), f"calibration: {self.describe(state)}", unit="tensor")

        def refit_linear(node: str, x: torch.Tensor) -> None:
            key = tensor_key(node, 1)
            state.set_weight(key, fit_weight(state.fp_weights[key], state.bits.weight(key), x.pow(2).mean(0)))
            if key in state.ref_biases:
                state.set_bias_correction(key, (state.fp_weights[key] - inst.weights[key].weight) @ x.mean(0))

        def fit_then_quantize(point, x):
            if point.key not in recipe.activations:
                bits = state.bits.act(point.key, point.role)
                kind = kind_for(point.role, bits, self.softmax_kind)
                if self.opt_m and point.role == "linear_input" and module_of(point.key).endswith("mlp.fc2"):
                    params = self._opt_m(state, point.key, x, bits)
                else:
                    params = get_kind(kind).fit(x, bits, point)
                set_activation(state, point.key, kind, bits, params)
            bar.update(1)
            quantize_as_recipe(state, point)
            xq = point.action(point, x)
            if point.role == "linear_input" and self.weights:
                refit_linear(split_key(point.key)[0], xq.reshape(-1, xq.shape[-1]))
            return xq

        inst.set_action(fit_then_quantize)
        state.model(state.images)
        bar.close()

    @staticmethod
    def _opt_m(state: CalibState, key: str, x: torch.Tensor, bits: int) -> dict:
        lo, hi, rows = channel_stats(x, OPT_M_ROWS)
        weight = state.fp_weights.get(tensor_key(split_key(key)[0], 1))
        if weight is None:  # weights not fitted yet: the layer's own
            weight = state.inst.weights[tensor_key(split_key(key)[0], 1)].weight
        scale, zero_point = fit_uniform_rows(rows.to(x.device), bits, weight.detach().float(), (lo.min(), hi.max()))
        return {"scale": scale, "zero_point": zero_point}
