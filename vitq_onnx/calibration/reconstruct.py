"""Block-wise reconstruction: train each quantized transformer block to reproduce the float block.

The float model runs once and every block's output on the calibration images is cached. Then,
block by block from the first, the quantized block reads the quantized previous block's output
and its chosen parameters (latent weights through straight-through rounding, per-channel weight
scales, activation quantizer scales (LSQ), biases) are trained with Adam and a cosine schedule
to match the cached float output (mean squared error). The trained values go back into the model
and the recipe: weight codes and scales, bias changes, quantizer parameters; the exported graph
and the simulation then compute exactly what the recipe says, as for any other method.

Memory: the cache holds one float tensor per block and image (DeiT-Ti: 12 x 197 x 192 floats,
1.8 MB per image), plus the current block's inputs.
"""

from __future__ import annotations

import copy
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe import WeightQuant
from .bits import module_of
from .quantizers import get_kind
from .quantizers.weights import fake_weight_ste, float16_values, weight_codes
from .stages import Stage, set_activation
from .state import CalibState

CHUNK = 32  # images per no-grad forward (bounds the attention maps held at once)
LEARNABLE = ("weights", "weight_scales", "act_scales", "biases")


class _Stop(Exception):
    pass


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child of a Sequential named ``blocks`` (ViT/DeiT ``blocks.N``, Swin ``layers.M.blocks.N``)."""
    return [(f"{name}.{i}", child) for name, mod in model.named_modules()
            if isinstance(mod, nn.Sequential) and name.rpartition(".")[2] == "blocks"
            for i, child in enumerate(mod)]


def _follows(prev: str, name: str) -> bool:
    """Does block ``name`` read exactly what block ``prev`` outputs (consecutive in one Sequential)?"""
    p_parent, _, p_i = prev.rpartition(".")
    parent, _, i = name.rpartition(".")
    return p_parent == parent and int(i) == int(p_i) + 1


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``block`` receives when ``model`` runs on ``images`` (the forward stops there)."""
    seen = []

    def stop(_mod, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = block.register_forward_pre_hook(stop)
    try:
        for i in range(0, len(images), CHUNK):
            try:
                model(images[i:i + CHUNK])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def block_outputs(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every named block's output on ``images``, from one pass of the model."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: seen[n].append(out.detach())) for n in names]
    try:
        for i in range(0, len(images), CHUNK):
            model(images[i:i + CHUNK])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def _run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([block(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])


class _Trainable:
    """The quantized block's parameters as leaves to train, and how to write them back.

    Scales are trained as their logarithms: Adam's steps are then relative, the same for a
    weight scale of 0.01 and an activation scale of 1, and a scale can never reach zero.
    """

    def __init__(self, state: CalibState, block: str, learn: tuple[str, ...]):
        self.state, self.groups = state, {k: [] for k in LEARNABLE}
        self.points = [p for k, p in state.inst.points.items() if module_of(k).startswith(block + ".")]
        self.layers = [k for k in state.inst.weights if module_of(k).startswith(block + ".")]
        self.act_params, self.w = {}, {}
        device = state.images.device
        for point in self.points:
            q = state.recipe.activations[point.key]
            kind = get_kind(q.kind)
            fixed = {k: torch.tensor(float(v), device=device) for k, v in q.params.items()}
            logs = {k: nn.Parameter(fixed.pop(k).log()) for k in kind.learnable} if "act_scales" in learn else {}
            self.groups["act_scales"] += list(logs.values())
            self.act_params[point.key] = (fixed, logs)
            point.action = lambda p, t, kind=kind, fixed=fixed, logs=logs, bits=q.bits: kind.fake_ste(
                t, {**fixed, **{k: v.exp() for k, v in logs.items()}}, bits)
        for key in self.layers:
            mod, wq = state.inst.weights[key], state.recipe.weights[key]
            latent = nn.Parameter(state.fp_weights[key].clone(), requires_grad="weights" in learn)
            log_scale = nn.Parameter(torch.from_numpy(wq.scale).to(device).log(),
                                     requires_grad="weight_scales" in learn)
            bias = None if key not in state.ref_biases else nn.Parameter(mod.bias.detach().clone(),
                                                                          requires_grad="biases" in learn)
            self.w[key] = (latent, log_scale, bias)
            for group, p in (("weights", latent), ("weight_scales", log_scale), ("biases", bias)):
                if p is not None and p.requires_grad:
                    self.groups[group].append(p)
            mod.forward = types.MethodType(_ste_forward(latent, log_scale, bias, wq.bits), mod)

    @torch.no_grad()
    def write_back(self) -> None:
        """Trained values into the recipe and the model, quantized exactly as deployed."""
        state = self.state
        for point in self.points:
            q = state.recipe.activations[point.key]
            fixed, logs = self.act_params[point.key]
            set_activation(state, point.key, q.kind, q.bits, {**fixed, **{k: v.exp() for k, v in logs.items()}})
            q = state.recipe.activations[point.key]
            params = {k: torch.tensor(float(v), device=state.images.device) for k, v in q.params.items()}
            point.action = lambda p, t, kind=get_kind(q.kind), params=params, bits=q.bits: kind.fake(t, params, bits)
        for key in self.layers:
            latent, log_scale, bias = self.w[key]
            mod, bits = state.inst.weights[key], state.recipe.weights[key].bits
            scale = float16_values(log_scale.detach().exp())
            codes = weight_codes(latent.detach(), scale, bits)
            del mod.forward  # back to the module's own forward on the dequantized weight
            mod.weight.copy_(codes * scale.reshape(-1, *([1] * (codes.dim() - 1))))
            state.recipe.weights[key] = WeightQuant(bits, scale.cpu().numpy(), codes.cpu().numpy().astype("int8"))
            if bias is not None:
                state.set_bias_correction(key, bias.detach() - state.ref_biases[key])


def _ste_forward(latent, log_scale, bias, bits):
    def forward(self, x):
        w = fake_weight_ste(latent, log_scale.exp(), bits)
        b = self.bias if bias is None else bias  # layers whose bias is not trained keep their own
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, b)
        return F.linear(x, w, b)

    return forward


@dataclass
class BlockReconstruction(Stage):
    """Block-wise reconstruction on the engine above; every setting is per block."""

    iters: int = 200
    batch_size: int = 32
    lr_weights: float = 1e-4
    lr_scales: float = 1e-3  # on log(scale): 0.1 % per step at most
    lr_biases: float = 1e-4
    learn: tuple[str, ...] = LEARNABLE
    name = "block_reconstruction"

    def describe(self, state):
        return (f"block reconstruction ({len(transformer_blocks(state.model))} blocks, {self.iters} iterations "
                f"each, batch {self.batch_size}, {len(state.images)} images)")

    def run(self, state: CalibState) -> None:
        blocks = transformer_blocks(state.model)
        if not blocks:
            state.say("  no transformer blocks found: nothing to reconstruct")
            return
        fp = copy.deepcopy(state.fp_model).eval().to(state.images.device)
        targets = block_outputs(fp, [n for n, _ in blocks], state.images)
        del fp
        lrs = {"weights": self.lr_weights, "weight_scales": self.lr_scales, "act_scales": self.lr_scales,
               "biases": self.lr_biases}
        gen = torch.Generator().manual_seed(state.options.seed)
        budget, start = state.options.time_budget, time.time()
        iters = [self.iters] * len(blocks)
        bar = state.progress(sum(iters), "calibration: block reconstruction")
        report = {"iters": [], "loss_before": [], "loss_after": []}
        x = None
        for i, (name, block) in enumerate(blocks):
            if x is None or not _follows(blocks[i - 1][0], name):
                x = block_inputs(state.model, block, state.images)
            y = targets.pop(name)
            trainable = _Trainable(state, name, self.learn)
            opt = torch.optim.Adam([{"params": p, "lr": lrs[g]} for g, p in trainable.groups.items() if p])
            if budget is not None and i > 0:  # share what is left of the budget among the blocks left
                per_iter = (time.time() - start) / max(1, sum(report["iters"]))
                left = max(0.0, budget - (time.time() - start)) / (len(blocks) - i)
                iters[i] = max(1, min(self.iters, int(left / per_iter)))
                bar.total = sum(report["iters"]) + sum(iters[i:])
            elif budget is not None:
                iters[0] = max(1, min(self.iters, int(budget / len(blocks) / self._step_seconds(block, x, y))))
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters[i], eta_min=0.0)
            report["loss_before"].append(round(F.mse_loss(_run(block, x), y).item(), 6))
            for _ in range(iters[i]):
                idx = torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=gen).to(x.device)
                loss = F.mse_loss(block(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1, block=f"{i + 1}/{len(blocks)}", loss=loss.item())
            trainable.write_back()
            x_next = _run(block, x)
            report["iters"].append(iters[i])
            report["loss_after"].append(round(F.mse_loss(x_next, y).item(), 6))
            x = x_next
        bar.close()
        state.recipe.info["reconstruction"] = {"blocks": len(blocks), "batch_size": self.batch_size,
                                               "images": len(state.images), **report}

    def _step_seconds(self, block, x, y) -> float:
        """Time of one training step (forward and backward, Adam's step on top), to size the
        first block under a time budget."""
        batch = slice(0, min(self.batch_size, len(x)))
        t = time.time()
        for _ in range(2):
            F.mse_loss(block(x[batch]), y[batch]).backward()
        block.zero_grad(set_to_none=True)
        return max(1e-3, (time.time() - t) / 2 * 1.1)
