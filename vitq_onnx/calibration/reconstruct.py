"""Block-wise reconstruction: train each quantized transformer block to reproduce the float block.

The float model runs once and every block's output on the calibration images is cached. Then,
block by block from the first, the quantized block reads the quantized previous block's output
and its chosen parameters (latent weights through straight-through rounding, per-channel weight
scales, activation quantizer scales (LSQ), biases) are trained with Adam and a cosine schedule
to match the cached float output (mean squared error). The trained values go back into the model
and the recipe: weight codes and scales, bias changes, quantizer parameters; the exported graph
and the simulation then compute exactly what the recipe says, as for any other method.

Memory: the cache holds one float tensor per block and image (DeiT-Ti: 12 x 197 x 192 floats,
1.8 MB per image), and as much again for the Fisher weights, in temporary files past CACHE_BYTES;
the Fisher pass takes as many images at once as fit GRAD_PASS_BYTES; plus the current block's
inputs and its training batch.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitqError
from ..recipe import WeightQuant, split_key
from .bits import module_of
from .quantizers import get_kind, torch_params
from .quantizers.weights import fake_weight_ste, float16_values, weight_codes, weight_values
from .stages import Stage, quantize_as_recipe, set_activation
from .state import CalibState

CHUNK = 32  # images per no-grad forward (bounds the attention maps held at once)
GRAD_PASS_BYTES = 4 * 2**30  # what the Fisher pass's autograd may hold at once (grad_chunk)
CACHE_BYTES = 2**30  # block outputs (and Fisher weights) held in memory up to this, else on disk
HEAD = "head"  # the unit after the last block: final norm and classifier, trained against the logits
LEARNABLE = ("weights", "weight_scales", "act_scales", "biases")


class _Stop(Exception):
    pass


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child of a Sequential or ModuleList named ``blocks`` (ViT/DeiT ``blocks.N``, Swin
    ``layers.M.blocks.N``, BEiT/EVA ``blocks.N``, PVT v2 ``stages.M.blocks.N``), and the layers of a
    Hugging Face encoder (a ModuleList named ``layer`` or ``layers`` of transformers modules)."""
    return [(f"{name}.{i}", child) for name, mod in model.named_modules() if _holds_blocks(name, mod)
            for i, child in enumerate(mod)]


def _holds_blocks(name: str, mod: nn.Module) -> bool:
    last = name.rpartition(".")[2]
    if last == "blocks":
        return isinstance(mod, (nn.Sequential, nn.ModuleList))
    return last in ("layer", "layers") and isinstance(mod, nn.ModuleList) and len(mod) > 0 \
        and all(type(child).__module__.startswith("transformers.") for child in mod)


def _follows(prev: str, name: str) -> bool:
    """Does block ``name`` read exactly what block ``prev`` outputs (consecutive in one Sequential)?"""
    p_parent, _, p_i = prev.rpartition(".")
    parent, _, i = name.rpartition(".")
    return p_parent == parent and int(i) == int(p_i) + 1


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``block`` receives as its first input when ``model`` runs on ``images``."""
    return block_call(model, block, images)[0]


@torch.no_grad()
def block_call(model: nn.Module, block: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """What ``block`` receives when ``model`` runs on ``images`` (the forward stops there): its
    input, and the other arguments the model passes it (EVA's rotary embedding, PVT's feature
    size), which must be the same for every image (``bound`` makes the block a function of x)."""
    seen, extra = [], []

    def stop(_mod, args, kwargs):
        seen.append(args[0].detach())
        extra.append((args[1:], kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for i in range(0, len(images), CHUNK):
            try:
                model(images[i:i + CHUNK])
            except _Stop:
                pass
    finally:
        handle.remove()
    args, kwargs = extra[0]
    if any(not _same(e, extra[0]) for e in extra[1:]) or _per_image(extra[0], len(seen[0])):
        raise VitqError(f"block reconstruction: a {type(block).__name__} block takes per-image arguments "
                        "besides its input; reconstruct with another method (--method repq)")
    return torch.cat(seen), args, kwargs


def bound(block: Callable, args: tuple, kwargs: dict) -> Callable:
    """``block`` as a function of its input alone, the other arguments bound."""
    return block if not args and not kwargs else lambda x: block(x, *args, **kwargs)


def _same(a, b) -> bool:
    """Equal argument structures (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _per_image(extra, batch: int) -> bool:
    """Does an argument hold one entry per image (a tensor with the batch on its first axis)?"""
    args, kwargs = extra
    return batch > 1 and any(isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[0] == batch
                             for t in (*args, *kwargs.values()))


class BlockCache(Mapping):
    """Per block, a tensor built chunk by chunk along the image axis: in memory, or, once the whole
    cache would pass CACHE_BYTES, in temporary files read back one block at a time (a 518-px
    ViT-S's outputs and Fisher weights: 6.8 GB). Either way a block reads back bit for bit the
    concatenation of its chunks; ``transform`` is applied as it is read."""

    def __init__(self, expected_bytes: int, transform: Callable | None = None):
        self.folder = tempfile.TemporaryDirectory(prefix="vitq-cache-") if expected_bytes > CACHE_BYTES else None
        self.transform = transform or (lambda t: t)
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.dtype, int]] = {}

    def add(self, name: str, chunk: torch.Tensor) -> None:
        chunk = chunk.detach()
        if self.folder is None:
            self.chunks.setdefault(name, []).append(chunk)
            return
        with open(self._path(name), "ab") as f:
            f.write(chunk.contiguous().cpu().numpy().tobytes())
        shape, dtype, n = self.shapes.get(name, (chunk.shape[1:], chunk.dtype, 0))
        self.shapes[name] = (shape, dtype, n + chunk.shape[0])
        self.device = chunk.device

    def _path(self, name: str) -> str:
        return os.path.join(self.folder.name, name.replace("/", "_"))

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.folder is None:
            return self.transform(torch.cat(self.chunks[name]))
        shape, dtype, n = self.shapes[name]
        values = np.fromfile(self._path(name), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return self.transform(torch.from_numpy(values).reshape(n, *shape).to(self.device))

    def pop(self, name: str, *default):
        if name not in self:
            return default[0] if default else self[name]
        value = self[name]
        self.chunks.pop(name, None)
        if self.folder is not None:
            os.remove(self._path(name))
            self.shapes.pop(name)
        return value

    def __contains__(self, name) -> bool:
        return name in (self.chunks if self.folder is None else self.shapes)

    def __iter__(self):
        return iter(self.chunks if self.folder is None else self.shapes)

    def __len__(self) -> int:
        return len(self.chunks if self.folder is None else self.shapes)


def _fisher_weights(g2: torch.Tensor) -> torch.Tensor:
    return 1 + g2 / g2.mean().clamp_min(1e-30)


def grad_chunk(model: nn.Module, image: torch.Tensor) -> int:
    """Images per gradient pass: CHUNK, or fewer where the activations autograd saves for CHUNK
    images (measured on one) would pass GRAD_PASS_BYTES (a 518-px ViT-S: about 0.8 GB per image)."""
    saved: dict[int, int] = {}
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in fixed:  # a weight is saved once, whatever the batch
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(image)
    return max(1, min(CHUNK, GRAD_PASS_BYTES // max(1, sum(saved.values()))))


@torch.no_grad()
def block_outputs(model: nn.Module, names: list[str], images: torch.Tensor,
                  fisher: bool = False) -> tuple[BlockCache, BlockCache | dict]:
    """Every named block's output on ``images``, and the model's (as ``HEAD``), from one pass; with
    ``fisher`` also each block output's weights for the reconstruction loss, 1 + g^2 / mean(g^2),
    g the gradient of the float model's cross-entropy against its own prediction at that output
    (the diagonal of the empirical Fisher, as BRECQ's loss): errors where the prediction is
    sensitive count more; the 1 keeps every element's plain squared error in the loss. (The
    outputs are the same with gradients on: checked bitwise on DeiT-Ti, CPU.)"""
    chunk = grad_chunk(model, images[:1]) if fisher else CHUNK
    outs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
               for n in names]
    seen = grads = None
    try:
        for i in range(0, len(images), chunk):
            with torch.set_grad_enabled(fisher):
                logits = model(images[i:i + chunk])
                if fisher:  # autograd.grad: only these outputs' gradients, none kept in the parameters
                    loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
                    g2 = [g.pow(2) for g in torch.autograd.grad(loss, [outs[n] for n in names])]
            if seen is None:  # the whole cache's size, from the first chunk's
                per_image = sum(outs[n][0].nbytes for n in names) + logits[0].nbytes
                seen = BlockCache(per_image * len(images))
                grads = BlockCache(per_image * len(images), _fisher_weights) if fisher else {}
            for n in names:
                seen.add(n, outs[n])
            seen.add(HEAD, logits)
            for n, g in zip(names, g2 if fisher else []):
                grads.add(n, g)
            outs.clear()
    finally:
        for h in handles:
            h.remove()
    return seen, grads


@torch.no_grad()
def run_chunked(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """``forward`` on ``x`` in chunks of CHUNK images, without gradients."""
    return torch.cat([forward(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])


# weights wider than this many bits are near float: they learn slower (``lr_width``) and, where a
# method asks, for fewer iterations (``wide_iters``)
NEAR_FLOAT_ABOVE = 4


class _Trainable:
    """The quantized block's parameters as leaves to train, and how to write them back.

    Scales are trained as their logarithms: Adam's steps are then relative, the same for a
    weight scale of 0.01 and an activation scale of 1, and a scale can never reach zero.
    """

    def __init__(self, state: CalibState, unit: "_Unit", learn: tuple[str, ...], drop: float,
                 quantized: bool = True, lr_width: bool = False):
        self.state, self.groups, self.quantized = state, {k: [] for k in LEARNABLE}, quantized
        self.lr_factor: dict[nn.Parameter, float] = {}  # a parameter's learning rate over its group's
        self.points = [p for k, p in state.inst.points.items() if unit.owns(k)]
        self.layers = [k for k in state.inst.weights if unit.owns(k)]
        self.act_params, self.w = {}, {}
        device = state.images.device
        for point in self.points:
            q = state.recipe.activations[point.key]
            kind = get_kind(q.kind)
            fixed = torch_params(q, device)
            logs = {k: nn.Parameter(fixed.pop(k).log()) for k in kind.learnable} if "act_scales" in learn else {}
            self.groups["act_scales"] += list(logs.values())
            self.act_params[point.key] = (fixed, logs)
            point.action = lambda p, t, kind=kind, fixed=fixed, logs=logs, bits=q.bits: _drop(t, drop, kind.fake_ste(
                t, {**fixed, **{k: v.exp() for k, v in logs.items()}}, bits))
        for key in self.layers:
            mod = state.inst.weights[key]
            latent = nn.Parameter(state.fp_weights[key].clone(), requires_grad="weights" in learn)
            log_scale = None if not quantized else nn.Parameter(
                torch.from_numpy(state.recipe.weights[key].scale).to(device).log(),
                requires_grad="weight_scales" in learn)
            bias = None if key not in state.ref_biases else nn.Parameter(mod.bias.detach().clone(),
                                                                          requires_grad="biases" in learn)
            self.w[key] = (latent, log_scale, bias)
            if lr_width and quantized:
                self.lr_factor[latent] = min(1.0, 2.0 ** (NEAR_FLOAT_ABOVE - state.bits.weight(key)))
            for group, p in (("weights", latent), ("weight_scales", log_scale), ("biases", bias)):
                if p is not None and p.requires_grad:
                    self.groups[group].append(p)
            mod.forward = types.MethodType(_ste_forward(latent, log_scale, bias, state.bits.weight(key)), mod)

    def param_groups(self, lrs: dict[str, float]) -> list[dict]:
        """Adam's groups: one per kind of parameter and learning-rate factor."""
        groups: dict[tuple[str, float], list[nn.Parameter]] = {}
        for kind, params in self.groups.items():
            for p in params:
                groups.setdefault((kind, self.lr_factor.get(p, 1.0)), []).append(p)
        return [{"params": ps, "lr": lrs[kind] * factor} for (kind, factor), ps in groups.items()]

    @torch.no_grad()
    def write_back(self) -> None:
        """Trained values into the recipe and the model, quantized exactly as deployed."""
        state = self.state
        for point in self.points:
            q = state.recipe.activations[point.key]
            fixed, logs = self.act_params[point.key]
            set_activation(state, point.key, q.kind, q.bits, {**fixed, **{k: v.exp() for k, v in logs.items()}})
            quantize_as_recipe(state, point)
        for key in self.layers:
            latent, log_scale, bias = self.w[key]
            mod, bits = state.inst.weights[key], state.bits.weight(key)
            del mod.forward  # back to the module's own forward on the (dequantized) weight
            if self.quantized:
                scale = float16_values(log_scale.detach().exp())
                codes = weight_codes(latent.detach(), scale, bits)
                mod.weight.copy_(weight_values(codes, scale))
                state.recipe.weights[key] = WeightQuant(bits, scale.cpu().numpy(), codes.cpu().numpy().astype("int8"))
            else:  # float weights, quantized by a later stage from these
                mod.weight.copy_(latent.detach())
                state.fp_weights[key] = latent.detach().clone()
                state.retrained.add(key)
            if bias is not None:
                state.set_bias_correction(key, bias.detach() - state.ref_biases[key])


def _drop(x: torch.Tensor, p: float, xq: torch.Tensor) -> torch.Tensor:
    """QDrop (Wei et al. 2022): each element keeps its float value with probability p while
    training, which makes the trained weights robust to the quantization noise around them."""
    if p <= 0 or not torch.is_grad_enabled():
        return xq
    return torch.where(torch.rand_like(x) < p, x, xq)


@dataclass
class _Unit:
    """One part of the model trained at once: a transformer block, or the head after the last."""

    name: str
    forward: nn.Module | Callable
    owns: Callable[[str], bool]  # recipe key -> is this unit's quantizer or weight


def _units(state: CalibState, head: bool) -> list[_Unit]:
    blocks = transformer_blocks(state.model)
    units = [_Unit(n, b, lambda k, n=n: module_of(k).startswith(n + ".")) for n, b in blocks]
    model = state.model
    if head and blocks and hasattr(model, "forward_head") and isinstance(getattr(model, "norm", None), nn.Module):
        points = list(state.inst.points)  # in forward order: the head's come after the last block's
        last = max(i for i, k in enumerate(points) if units[-1].owns(k))
        tail = {split_key(k)[0] for k in points[last + 1:]}
        units.append(_Unit(HEAD, lambda x: model.forward_head(model.norm(x)), lambda k: split_key(k)[0] in tail))
    return units


def _ste_forward(latent, log_scale, bias, bits):
    def forward(self, x):
        w = latent if log_scale is None else fake_weight_ste(latent, log_scale.exp(), bits)
        b = self.bias if bias is None else bias  # layers whose bias is not trained keep their own
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, b)
        return F.linear(x, w, b)

    return forward


@dataclass
class BlockReconstruction(Stage):
    """Block-wise reconstruction on the engine above; every setting is per block."""

    # defaults chosen on DeiT-Ti W4/A4 by the KL to the float model on calibration images held out
    # from training (docs/results.md, benchmarks/recon_settings.py): batch 16 generalized better than 32,
    # more iterations at batch 32 did not, and this fits 2 CPU cores
    iters: int = 200
    batch_size: int = 16
    lr_weights: float = 3e-4
    lr_scales: float = 3e-3  # on log(scale): 0.3 % per step at most
    lr_biases: float = 1e-4
    learn: tuple[str, ...] = LEARNABLE
    drop: float = 0.0  # QDrop probability of keeping an activation float while training
    head: bool = False  # also train the head (final norm, classifier) against the float logits
    quantized_weights: bool = True  # False: weights train in float (I&S-ViT's first stage)
    # weight each block output's squared error by the float model's Fisher diagonal (block_outputs):
    # on held-out calibration images it lowered the KL to the float model by 13-14 % (docs/results.md)
    fisher: bool = True
    # quantized latent weights wider than 4 bits learn at lr_weights x 2^(4 - bits), in step with
    # their grid (half the step per added bit): at one rate for every width, 6-bit weights wander
    # over many steps. On held-out calibration images it lowered the KL of the --avg-bits 4 map
    # after reconstruction from 0.429 to 0.342; doubling the rate at 3 bits too did not help that
    # map (0.344) and raised the W3/A3 KL of ias (1.604 -> 1.654), so narrower weights keep it
    lr_width: bool = True
    # iterations of a unit whose quantized weights are all wider than 4 bits (None: ``iters``):
    # near-float weights need less; I&S-ViT trains 5x fewer at W6 than at W3/W4
    wide_iters: int | None = None
    name = "block_reconstruction"

    def unit_iters(self, state: CalibState, unit: "_Unit") -> int:
        """This unit's iterations: ``wide_iters`` when all its weights are wider than 4 bits."""
        widths = [state.bits.weight(k) for k in state.inst.weights if unit.owns(k)]
        return self.wide_iters if self.wide_iters is not None and widths and min(widths) > NEAR_FLOAT_ABOVE else self.iters

    def describe(self, state):
        units = _units(state, self.head)
        counts = sorted({self.unit_iters(state, u) for u in units})
        return (f"block reconstruction ({len(units)} units, {'/'.join(map(str, counts))} iterations each, batch "
                f"{self.batch_size}, {len(state.images)} images, "
                f"{'quantized' if self.quantized_weights else 'float'} weights)")

    def run(self, state: CalibState) -> None:
        units = _units(state, self.head)
        if not units:
            state.say("  no transformer blocks found: nothing to reconstruct")
            return
        state.keep_float_reference()
        fp = copy.deepcopy(state.fp_model).eval().to(state.images.device)
        names = [u.name for u in units if u.name != HEAD]
        targets, weights = block_outputs(fp, names, state.images, self.fisher)
        del fp
        lrs = {"weights": self.lr_weights, "weight_scales": self.lr_scales, "act_scales": self.lr_scales,
               "biases": self.lr_biases}
        gen = torch.Generator().manual_seed(state.options.seed)
        torch.manual_seed(state.options.seed)  # QDrop's masks
        deadline = state.stage_deadline  # set by calibrate._run_stages under --time-budget, else None
        step_s = overhead_s = None  # under a deadline: seconds per training step, per unit outside its steps
        iters = [self.unit_iters(state, u) for u in units]
        bar = state.progress(sum(iters), f"calibration: block reconstruction "
                                         f"({'quantized' if self.quantized_weights else 'float'} weights)")
        report = {"units": [u.name for u in units], "iters": [], "loss_before": [], "loss_after": []}
        x = None
        for i, unit in enumerate(units):
            unit_start = time.time()
            if x is None or not (unit.name == HEAD or _follows(units[i - 1].name, unit.name)):
                x, args, kwargs = block_call(state.model, unit.forward, state.images)
            if unit.name != HEAD:  # (a block next in line takes the same arguments as the one before)
                unit.forward = bound(unit.forward, args, kwargs)
            y, w = targets.pop(unit.name), weights.pop(unit.name, None)

            def loss_of(out, idx=slice(None)):
                return F.mse_loss(out, y[idx]) if w is None else (w[idx] * (out - y[idx]).pow(2)).mean()

            trainable = _Trainable(state, unit, self.learn, self.drop, self.quantized_weights, self.lr_width)
            opt = torch.optim.Adam(trainable.param_groups(lrs))
            eval_start = time.time()
            report["loss_before"].append(round(loss_of(run_chunked(unit.forward, x)).item(), 6))
            if deadline is not None:  # the steps that fit: what is left, less every unit's work outside its steps
                eval_s = time.time() - eval_start  # (the output pass after training costs as much)
                step_s = step_s or self._step_seconds(unit.forward, x, y, opt)
                overhead_s = overhead_s or (time.time() - unit_start + eval_s)
                left = deadline - time.time() - eval_s - (len(units) - i - 1) * overhead_s
                unit_end = time.time() + left / (len(units) - i)  # its share, held to by the clock below
                iters[i] = max(1, min(iters[i], int(left / (len(units) - i) / step_s)))
                bar.set_total(sum(report["iters"]) + sum(iters[i:]))
                if i == 0:
                    state.say(f"  plan: {len(units)} units x {iters[0]} iterations of {step_s:.2f} s, "
                              f"{overhead_s:.1f} s per unit besides, {(deadline - time.time()) / 60:.1f} minutes "
                              "left for this stage")
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters[i], eta_min=0.0)
            steps_start, done = time.time(), 0
            for _ in range(iters[i]):
                idx = torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=gen).to(x.device)
                loss = loss_of(unit.forward(x[idx]), idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1, unit=f"{i + 1}/{len(units)}", loss=loss.item())
                done += 1
                if deadline is not None and time.time() > unit_end:  # slower steps than measured
                    break
            if deadline is not None:  # measured, for the units left
                step_s, iters[i] = (time.time() - steps_start) / done, done
            trainable.write_back()
            x_next = run_chunked(unit.forward, x)
            if deadline is not None:
                overhead_s = time.time() - unit_start - (iters[i] * step_s)
            report["iters"].append(iters[i])
            report["loss_after"].append(round(loss_of(x_next).item(), 6))
            x = x_next
        bar.close()
        stage = "reconstruction" if self.quantized_weights else "float_weight_reconstruction"
        state.recipe.info[stage] = {"batch_size": self.batch_size, "images": len(state.images),
                                    "drop": self.drop, "loss": "fisher" if self.fisher else "mse",
                                    "lr_width": self.lr_width and self.quantized_weights, **report}

    def _step_seconds(self, forward, x, y, opt) -> float:
        """Time of one training step (forward and backward, Adam's step on top), to size the
        first unit under a time budget."""
        batch = slice(0, min(self.batch_size, len(x)))
        t = time.time()
        for _ in range(2):
            F.mse_loss(forward(x[batch]), y[batch]).backward()
        opt.zero_grad(set_to_none=True)
        return max(1e-3, (time.time() - t) / 2 * 1.1)
