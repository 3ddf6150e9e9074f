"""Evol-Q (Frumkin et al. 2023): an evolutionary search of quantization scales, scored by InfoNCE.

Why: the loss of a quantized ViT over its scales is jagged, so fitting (per-layer MSE, gradient
reconstruction) stops in a local minimum that a small random jump can leave. This stage can end
any method (``--search evol``, or on an earlier export's recipe).

What is searched, block by block (last to first, ``passes`` times): the per-output-channel scales
of every quantized weight in the block (qkv, proj, fc1, fc2) and the scales of the block's
activation quantizers (each kind's ``learnable`` ones). Evol-Q searched only qkv and proj weight
scales, at 8-bit activations; at A4/A3 the activation grids carry most of the error (``vitq-onnx
report``), so they are searched too. Zero points, bit widths and trained weight codes stay.

How: regularized evolution as in Evol-Q. A candidate is a log-offset of each searched scale from
the block's current one; the population starts as the current scales and mutants of them; each
cycle samples ``sample`` members, mutates the fittest (each scale tensor by one offset, uniform in
±``mutation``·2^(4 − bits) in log scale: a relative step, the same for a weight scale of 0.01
and an activation scale of 1, and about the same fraction of a quantization step at every
width, as Evol-Q's ten times smaller noise at 8 bits), scores the child and drops the least fit;
the block keeps the fittest.

Fitness: InfoNCE between the quantized and the float model's logits on the search images (the same
image's float logits are the positive, the other images' the negatives; cosine similarity over the
temperature, 3 as in the official code), or plain MSE of the logits (the ablation). The block's
input is computed once per visit, so each evaluation runs only the blocks from it to the logits.

No selection on test data: the last ``held_out`` calibration images (at most a quarter) are never
scored by the search. A block keeps its fittest scales only if the KL divergence of the quantized
predictions from the float ones on those images falls by more than twice its standard error
(paired over the images): on 61 scored DeiT-Ti images InfoNCE alone improved while that KL rose,
and at W8/A8 a gate on any fall kept noise. A pass that keeps no block ends the search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitqError
from ..recipe import WeightQuant
from .simulation import kl_per_image
from .quantizers import get_kind, torch_params
from .quantizers.weights import fake_weight, float16_values, weight_values
from .reconstruct import block_inputs, run_chunked, transformer_blocks
from .stages import Stage, quantize_as_recipe, set_activation
from .state import CalibState

TEMPERATURE = 3.0  # InfoNCE temperature of the official code


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cross-entropy of each quantized output against every float output, its own as the label."""
    sim = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return F.cross_entropy(sim, torch.arange(len(q), device=q.device))


FITNESS = {"infonce": info_nce, "mse": F.mse_loss}


SIGNIFICANCE = 2.0  # standard errors the held-out KL must fall by for a block to keep its new scales


def significantly_lower(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Is the mean of ``new`` below that of ``old`` by more than SIGNIFICANCE paired standard errors?"""
    d = (new - old).double()
    return bool(d.mean() < -SIGNIFICANCE * d.std() / len(d) ** 0.5)


class _BlockScales:
    """The searched scales of one block: its weights' per-channel scales and its activation
    quantizers' learnable ones, applied to the model for a candidate and committed to the recipe."""

    def __init__(self, state: CalibState, prefix: str):
        self.state, recipe = state, state.recipe
        self.weights = [k for k in state.inst.weights if k.startswith(prefix)]
        self.points = [state.inst.points[k] for k in state.inst.points
                       if k.startswith(prefix) and get_kind(recipe.activations[k].kind).learnable]
        self.sources = {}  # weight key -> what its codes are rounded from (trained codes: their values)
        for key in self.weights:
            q = recipe.weights[key]
            scale = torch.from_numpy(q.scale.astype(np.float32))
            self.sources[key] = state.fp_weights[key].cpu() if q.codes is None else \
                weight_values(torch.from_numpy(q.codes.astype(np.float32)), scale)
        self.base = self._current()
        self.bits = [recipe.weights[k].bits for k in self.weights] + [
            recipe.activations[p.key].bits for p in self.points for _ in get_kind(recipe.activations[p.key].kind).learnable]

    def _current(self) -> list[torch.Tensor]:
        recipe = self.state.recipe
        scales = [torch.from_numpy(recipe.weights[k].scale.astype(np.float32)) for k in self.weights]
        for point in self.points:
            q = recipe.activations[point.key]
            scales += [torch_params(q)[name] for name in get_kind(q.kind).learnable]
        return scales

    def zero(self) -> list[torch.Tensor]:
        return [torch.zeros_like(s) for s in self.base]

    def _scales(self, offsets):
        return [b * o.exp() for b, o in zip(self.base, offsets)]

    @torch.no_grad()
    def apply(self, offsets, commit: bool = False) -> None:
        """The model computes with these scales; with ``commit`` the recipe records them too."""
        state, recipe, scales = self.state, self.state.recipe, iter(self._scales(offsets))
        for key in self.weights:
            mod, q = state.inst.weights[key], recipe.weights[key]
            scale = float16_values(next(scales))  # weight scales are stored as float16
            weight = fake_weight(self.sources[key], scale, q.bits)
            mod.weight.copy_(weight.to(mod.weight.device))
            if commit:
                codes = None if q.codes is None else torch.round(weight / scale[:, None]).numpy().astype(np.int8)
                recipe.weights[key] = WeightQuant(q.bits, scale.numpy(), codes)
        for point in self.points:
            q = recipe.activations[point.key]
            kind = get_kind(q.kind)
            params = {**torch_params(q), **{name: next(scales) for name in kind.learnable}}
            if commit:
                set_activation(state, point.key, q.kind, q.bits, params)
                quantize_as_recipe(state, point)
            else:
                device_params = {k: v.to(state.images.device) for k, v in params.items()}
                point.action = lambda p, t, kind=kind, params=device_params, bits=q.bits: kind.fake(t, params, bits)
        if commit:
            self.base = self._current()


def _tail(model: nn.Module, blocks: list[tuple[str, nn.Module]], i: int):
    """The network from block ``i`` to the logits, where timm's ViT layout allows (one ``blocks``
    Sequential, then ``norm`` and ``forward_head``); else None (Swin: whole forwards)."""
    if not (hasattr(model, "forward_head") and isinstance(getattr(model, "norm", None), nn.Module)
            and isinstance(getattr(model, "blocks", None), nn.Sequential)  # (EVA's ModuleList blocks take
            and all(name.startswith("blocks.") for name, _ in blocks)):     # a rope; CaiT has more after them)
        return None
    rest = [b for _, b in blocks[i:]]
    return lambda x: model.forward_head(model.norm(reduce(lambda h, b: b(h), rest, x)))


@dataclass
class EvolSearch(Stage):
    """Evol-Q's search on the engine's state; the recipe's ``info['search']`` records it."""

    # defaults: about 8 minutes for DeiT-Ti on 2 CPU cores at 64 scored images; per-tensor moves of
    # 5 % (held-out calibration KL, benchmarks/recon_settings.py: per-channel ones fit noise)
    passes: int = 2
    population: int = 6
    cycles: int = 8
    sample: int = 3
    mutation: float = 0.05  # largest log-offset a mutation adds to a 4-bit scale (2^(4 - bits) times it)
    per_channel: bool = False  # True: every channel its own offset (Evol-Q); False: one per scale tensor
    fitness: str = "infonce"
    held_out: int = 32  # calibration images kept out of the search for its early stop (at most a quarter)
    budget: float | None = 570.0  # seconds (with the setup, under 10 min); then it keeps the best so far
    name = "evol_search"

    def describe(self, state):
        return (f"Evol-Q search ({self.fitness} fitness, {self.passes} passes x {len(transformer_blocks(state.model))} "
                f"blocks x {self.population + self.cycles} evaluations, "
                f"{len(state.images)} images, {min(self.held_out, len(state.images) // 4)} of them held out)")

    @torch.no_grad()
    def run(self, state: CalibState) -> None:
        blocks = transformer_blocks(state.model)
        if not blocks:
            state.say("  no transformer blocks found: nothing to search")
            return
        held_out = min(self.held_out, len(state.images) // 4)
        if held_out < 2:
            raise VitqError(f"the search needs at least 8 calibration images (has {len(state.images)}): "
                            "raise --num-calib")
        state.keep_float_reference()
        fitness = FITNESS[self.fitness]
        train, held = state.images[:-held_out], state.images[-held_out:]
        fp = state.float_model()
        fp_train, fp_held = run_chunked(fp, train), run_chunked(fp, held)
        del fp
        gen = torch.Generator().manual_seed(state.options.seed)
        evals = 0
        until = min(time.time() + self.budget if self.budget is not None else math.inf,  # its own cap, and
                    state.options.deadline if state.options.deadline is not None else math.inf)  # --time-budget's
        bar = state.progress(self.passes * len(blocks) * (self.population + self.cycles), "search: Evol-Q",
                             unit="eval")
        fit = first = fitness(run_chunked(state.model, train), fp_train).item()
        kl = kl_per_image(run_chunked(state.model, held), fp_held)
        kl_before = kl.mean().item()
        report = {"fitness": self.fitness, "temperature": TEMPERATURE if self.fitness == "infonce" else None,
                  "mutation": self.mutation, "per_channel": self.per_channel, "population": self.population,
                  "cycles": self.cycles, "images": len(train), "held_out": held_out, "fitness_before": round(first, 6),
                  "held_out_kl_before": round(kl_before, 6), "significance": SIGNIFICANCE, "passes": [],
                  "stopped": "passes"}
        for _ in range(self.passes):
            kept = []
            for i in reversed(range(len(blocks))):
                name, block = blocks[i]
                tail = _tail(state.model, blocks, i)

                def outputs(images):  # the logits, running from this block's input where the layout allows
                    if tail is None:
                        return lambda: run_chunked(state.model, images)
                    x = block_inputs(state.model, block, images)
                    return lambda: run_chunked(tail, x)

                on_train, on_held = outputs(train), outputs(held)
                scales = _BlockScales(state, name + ".")

                def score(offsets) -> float:
                    nonlocal evals
                    scales.apply(offsets)
                    evals += 1
                    bar.update(1, block=name, fitness=f"{fit:.5f}")
                    return fitness(on_train(), fp_train).item()

                best_fit, best = self._evolve(scales, score, gen, until)
                scales.apply(best)
                new_kl = kl_per_image(on_held(), fp_held)
                if significantly_lower(new_kl, kl):  # better on images the search never scored: keep it
                    scales.apply(best, commit=True)
                    fit, kl = best_fit, new_kl
                    kept.append(name)
                else:
                    scales.apply(scales.zero())
                if self._spent(until):
                    break
            report["passes"].append({"blocks_kept": kept, "fitness": round(fit, 6),
                                     "held_out_kl": round(kl.mean().item(), 6)})
            if self._spent(until):
                report["stopped"] = "budget"
                break
            if not kept:
                report["stopped"] = "held-out KL"
                break
        bar.close()
        report.update(evaluations=evals, fitness_after=round(fit, 6), held_out_kl_after=round(kl.mean().item(), 6))
        state.recipe.info["search"] = {"kind": "evol", **report}
        state.say(f"  search: fitness {first:.4f} -> {fit:.4f}, held-out KL {report['held_out_kl_before']:.4f}"
                  f" -> {report['held_out_kl_after']:.4f} ({evals} evaluations, stopped by {report['stopped']})")

    def _evolve(self, scales: _BlockScales, score, gen: torch.Generator, until: float):
        """Regularized evolution from the block's current scales: (fitness, offsets) of the fittest."""
        def mutate(offsets):
            return [o + (torch.rand(o.shape if self.per_channel else (), generator=gen) * 2 - 1)
                    * self.mutation * 2.0 ** (4 - bits) for o, bits in zip(offsets, scales.bits)]

        zero = scales.zero()
        pop = [(score(zero), zero)]
        while len(pop) < self.population and not self._spent(until):
            child = mutate(zero)
            pop.append((score(child), child))
        for _ in range(self.cycles):
            if self._spent(until):
                break
            idx = torch.randperm(len(pop), generator=gen)[:self.sample].tolist()
            child = mutate(min((pop[j] for j in idx), key=lambda m: m[0])[1])
            pop.append((score(child), child))
            pop.remove(max(pop, key=lambda m: m[0]))
        return min(pop, key=lambda m: m[0])

    @staticmethod
    def _spent(until: float) -> bool:
        return time.time() >= until
