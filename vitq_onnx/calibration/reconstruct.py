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
the Fisher pass takes as many images at once as fit GRAD_PASS_BYTES (BUDGET_GRAD_PASS_BYTES under a
time budget); plus the current block's
inputs and its training batch.
"""

from __future__ import annotations

import math
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
from ..families import block_rows
from ..recipe import WeightQuant, split_key
from .bits import module_of
from .quantizers import adaround, get_kind, torch_params
from .quantizers.weights import fake_weight_ste, float16_values, weight_codes, weight_values
from .stages import Stage, quantize_as_recipe, set_activation
from .state import CalibState

CHUNK = 32  # images per no-grad forward (bounds the attention maps held at once)
CHUNK_TOKENS = 32 * 197  # tokens per no-grad block pass (DeiT-Ti's CHUNK images; fewer images of more tokens)
# what the Fisher pass's autograd may hold at once (grad_chunk): 4 GiB keeps DeiT-Ti's 32 images at
# once (another chunk changes the gradients' last bits, so the bytes); under a time budget 1 GiB
# (a 518-px ViT-S: one image at a time, peak RSS 4.4 GB against 7.1 with 4 GiB)
GRAD_PASS_BYTES = 4 * 2**30
BUDGET_GRAD_PASS_BYTES = 2**30
CACHE_BYTES = 2**30  # block outputs (and Fisher weights) held in memory up to this, else on disk
# a training step's cost per image and block, in the block's share of a float forward: 4 for DeiT-Ti
# at 224 px (repq-recon's 527 s, ias's 864 s predicted within 10 %); at 1370 tokens about 19 (the
# fake-quantized attention maps dominate), where --time-budget measures the steps instead
STEP_FORWARDS = 4.0

# under a time budget: a block whose family computes chosen rows (Family.block_rows) trains on
# TRAIN_ROWS random token rows of each image once it has more than twice as many (a 518-px ViT: 256
# of 1370), the batch may shrink to MIN_BATCH images for more steps, and the losses reported before
# and after each unit are measured on BUDGET_LOSS_IMAGES images
TRAIN_ROWS = 256
MIN_BATCH = 4
BUDGET_LOSS_IMAGES = 8
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


def fisher_weights(g: torch.Tensor) -> torch.Tensor:
    """A block output's squared-error weights from its gradients ``g`` (``block_outputs``):
    1 + g^2 / mean(g^2)."""
    g2 = g.pow(2)
    return 1 + g2 / g2.mean().clamp_min(1e-30)


def grad_chunk(model: nn.Module, image: torch.Tensor, limit: int | None = None) -> int:
    """Images per gradient pass: CHUNK, or fewer where the activations autograd saves for CHUNK
    images (measured on one) would pass ``limit`` bytes (default GRAD_PASS_BYTES; a 518-px ViT-S
    saves about 0.8 GB per image)."""
    saved: dict[int, int] = {}
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in fixed:  # a weight is saved once, whatever the batch
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(image)
    return max(1, min(CHUNK, (limit or GRAD_PASS_BYTES) // max(1, sum(saved.values()))))


@torch.no_grad()
def block_outputs(model: nn.Module, names: list[str], images: torch.Tensor, fisher: bool = False,
                  grad_bytes: int | None = None, temperature: float = 1.0) -> tuple[BlockCache, BlockCache | dict]:
    """Every named block's output on ``images``, and the model's (as ``HEAD``), from one pass; with
    ``fisher`` also g, the gradient of the float model's cross-entropy against its own prediction
    at each block's output, per image: its square is the diagonal of the empirical Fisher (the
    loss's weights, ``fisher_weights``, as BRECQ's), g itself the image's rank-one Fisher term.
    (The outputs are the same with gradients on: checked bitwise on DeiT-Ti, CPU.)"""
    chunk = grad_chunk(model, images[:1], grad_bytes) if fisher else CHUNK
    outs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
               for n in names]
    seen = grads = None
    try:
        for i in range(0, len(images), chunk):
            with torch.set_grad_enabled(fisher):
                logits = model(images[i:i + chunk])
                if fisher:  # autograd.grad: only these outputs' gradients, none kept in the parameters
                    loss = F.cross_entropy(logits / temperature, logits.argmax(1), reduction="sum")
                    g = torch.autograd.grad(loss, [outs[n] for n in names])
            if seen is None:  # both caches' size, from the first chunk's
                total = (sum(outs[n][0].nbytes for n in names) + logits[0].nbytes) * len(images) * (1 + fisher)
                seen = BlockCache(total)
                grads = BlockCache(total) if fisher else {}
            for n in names:
                seen.add(n, outs[n])
            seen.add(HEAD, logits)
            for n, gn in zip(names, g if fisher else []):
                grads.add(n, gn)
            outs.clear()
    finally:
        for h in handles:
            h.remove()
    return seen, grads


def quantized_point_grads(fp: nn.Module, name: str, out: torch.Tensor, images: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """The gradient of the float model's cross-entropy against ``labels`` at block ``name``'s
    output when that output is ``out`` (the quantized blocks' up to it; the float blocks after):
    the Fisher where the quantized network is, not where the float one is (FIMA-Q)."""
    chunk, grads = grad_chunk(fp, images[:1]), []
    block = fp.get_submodule(name)
    for i in range(0, len(images), chunk):
        o = out[i:i + chunk].detach().requires_grad_(True)
        handle = block.register_forward_hook(lambda _m, _a, _o: o)
        try:
            with torch.enable_grad():
                loss = F.cross_entropy(fp(images[i:i + chunk]), labels[i:i + chunk], reduction="sum")
                grads.append(torch.autograd.grad(loss, o)[0])
        finally:
            handle.remove()
    return torch.cat(grads)


@torch.no_grad()
def run_chunked(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """``forward`` on ``x`` (images x tokens (or rows x columns) x channels) in chunks of CHUNK
    images, or of as many as hold CHUNK_TOKENS tokens (4 images of 1370), without gradients."""
    chunk = max(1, min(CHUNK, CHUNK_TOKENS // math.prod(x.shape[1:-1]))) if x.dim() >= 3 else CHUNK
    return torch.cat([forward(x[i:i + chunk]) for i in range(0, len(x), chunk)])


# weights wider than this many bits are near float: they learn slower (``lr_width``) and, where a
# method asks, for fewer iterations (``wide_iters``)
NEAR_FLOAT_ABOVE = 4


class _Trainable:
    """The quantized block's parameters as leaves to train, and how to write them back.

    Scales are trained as their logarithms: Adam's steps are then relative, the same for a
    weight scale of 0.01 and an activation scale of 1, and a scale can never reach zero.
    """

    def __init__(self, state: CalibState, unit: "_Unit", learn: tuple[str, ...], drop: float,
                 quantized: bool = True, lr_width: bool = False, from_float: bool = True,
                 rounding: str = "ste"):
        self.state, self.groups, self.quantized = state, {k: [] for k in (*LEARNABLE, "rounding")}, quantized
        self.gates: dict[str, tuple[torch.Tensor, nn.Parameter]] = {}  # rounding "adaround": floor codes, alphas
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
            # from the float weight; or (``from_float`` False) from the quantized one the model
            # holds, so that the codes an earlier stage trained stay while the scales move a little
            start = state.fp_weights[key] if from_float else mod.weight.detach()
            gated = quantized and rounding == "adaround" and "weights" in learn  # the gates train, not the weight
            latent = nn.Parameter(start.clone(), requires_grad="weights" in learn and not gated)
            log_scale = None if not quantized else nn.Parameter(
                torch.from_numpy(state.recipe.weights[key].scale).to(device).log(),
                requires_grad="weight_scales" in learn)
            bias = None if key not in state.ref_biases else nn.Parameter(mod.bias.detach().clone(),
                                                                          requires_grad="biases" in learn)
            self.w[key] = (latent, log_scale, bias)
            if gated:
                base, alpha = adaround.start(start, log_scale.detach().exp())
                self.gates[key] = (base, nn.Parameter(alpha))
            if lr_width and quantized:
                factor = min(1.0, 2.0 ** (NEAR_FLOAT_ABOVE - state.bits.weight(key)))
                self.lr_factor[self.gates[key][1] if key in self.gates else latent] = factor
            for group, p in (("weights", latent), ("weight_scales", log_scale), ("biases", bias),
                             ("rounding", self.gates.get(key, (None, None))[1])):
                if p is not None and p.requires_grad:
                    self.groups[group].append(p)
            make = _ste_forward(latent, log_scale, bias, state.bits.weight(key)) if key not in self.gates else \
                _gated_forward(*self.gates[key], log_scale, bias, state.bits.weight(key))
            mod.forward = types.MethodType(make, mod)

    def rounding_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's penalty over this unit's gates (``adaround.penalty``)."""
        return sum(adaround.penalty(alpha, beta) for _, alpha in self.gates.values())

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
                codes = weight_codes(latent.detach(), scale, bits) if key not in self.gates else \
                    adaround.codes(self.gates[key][0], self.gates[key][1].detach(), bits)
                mod.weight.copy_(weight_values(codes, scale))
                state.recipe.weights[key] = WeightQuant(bits, scale.cpu().numpy(), codes.cpu().numpy().astype("int8"))
            else:  # float weights, quantized by a later stage from these
                mod.weight.copy_(latent.detach())
                state.fp_weights[key] = latent.detach().clone()
                state.retrained.add(key)
            if bias is not None:
                state.set_bias_correction(key, bias.detach() - state.ref_biases[key])


AUGMENTATIONS = ("flip", "shift")
ROUNDINGS = ("ste", "adaround")  # how quantized weights train (BlockReconstruction.rounding)


def augmented(images: torch.Tensor, augment: tuple[str, ...]) -> torch.Tensor:
    """``images`` followed by each augmentation's copy of them (in ``augment``'s order): "flip"
    mirrors left-right; "shift" moves the content half a patch (8 px) down and right, reflecting
    the edges, so every patch holds a new crop."""
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise VitqError(f"unknown augmentation '{unknown[0]}': use {', '.join(AUGMENTATIONS)}")
    if not augment:
        return images
    copies = [images]
    for a in augment:
        if a == "flip":
            copies.append(images.flip(-1))
        else:
            copies.append(F.pad(images, (8, 0, 8, 0), mode="reflect")[..., :images.shape[-2], :images.shape[-1]])
    return torch.cat(copies)


def _drop(x: torch.Tensor, p: float, xq: torch.Tensor) -> torch.Tensor:
    """QDrop (Wei et al. 2022): each element keeps its float value with probability p while
    training, which makes the trained weights robust to the quantization noise around them."""
    if p <= 0 or not torch.is_grad_enabled():
        return xq
    return torch.where(torch.rand_like(x) < p, x, xq)


@dataclass
class _Unit:
    """One part of the model trained at once: a transformer block, or the head after the last."""

    name: str  # its last block's name (whose float output it is trained to)
    forward: nn.Module | Callable
    owns: Callable[[str], bool]  # recipe key -> is this unit's quantizer or weight
    first: str = ""  # its first block's name, where several blocks train as one (``spans``)
    entry: nn.Module | None = None  # that block, whose input the unit reads

    def __post_init__(self):
        self.first = self.first or self.name
        if self.entry is None and isinstance(self.forward, nn.Module):
            self.entry = self.forward


def spans(units: list[_Unit], span: int) -> list[_Unit]:
    """``span`` consecutive blocks (of one Sequential) as one unit, trained to the last one's
    float output: the blocks then make up for each other's errors; the head stays alone."""
    groups: list[list[_Unit]] = []
    for unit in units:
        group = groups[-1] if groups else None
        if group and len(group) < span and HEAD not in (unit.name, group[-1].name) \
                and _follows(group[-1].name, unit.name):
            group.append(unit)
        else:
            groups.append([unit])
    return [g[0] if len(g) == 1 else _Unit(g[-1].name, nn.Sequential(*[u.forward for u in g]),
                                           lambda k, g=g: any(u.owns(k) for u in g), g[0].first, g[0].entry)
            for g in groups]


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


def _gated_forward(base, alpha, log_scale, bias, bits):
    return _layer_forward(lambda: adaround.soft_weight(base, alpha, log_scale.exp(), bits), bias)


def _ste_forward(latent, log_scale, bias, bits):
    return _layer_forward(lambda: latent if log_scale is None else fake_weight_ste(latent, log_scale.exp(), bits),
                          bias)


def _layer_forward(weight: Callable[[], torch.Tensor], bias):
    """A Linear's or Conv2d's forward on ``weight()``, and on ``bias`` where it is trained (else
    the layer's own)."""
    def forward(self, x):
        w, b = weight(), self.bias if bias is None else bias
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
    # with ``fisher``, also each image's rank-one Fisher term (g . error)^2, g the gradient at the
    # block's output (FIMA-Q's low-rank part): errors that move the prediction count, not only large
    # ones; it starts at ``lowrank`` x the diagonal term's value (0: off)
    lowrank: float = 0.0
    # the Fisher pass's softmax temperature: above 1, confident images' gradients no longer vanish
    fisher_temperature: float = 1.0
    fisher_at: str = "float"  # or "quantized": each block's Fisher where its quantized input puts it
    # quantized latent weights wider than 4 bits learn at lr_weights x 2^(4 - bits), in step with
    # their grid (half the step per added bit): at one rate for every width, 6-bit weights wander
    # over many steps. On held-out calibration images it lowered the KL of the --avg-bits 4 map
    # after reconstruction from 0.429 to 0.342; doubling the rate at 3 bits too did not help that
    # map (0.344) and raised the W3/A3 KL of ias (1.604 -> 1.654), so narrower weights keep it
    lr_width: bool = True
    # iterations of a unit whose quantized weights are all wider than 4 bits (None: ``iters``):
    # near-float weights need less; I&S-ViT trains 5x fewer at W6 than at W3/W4
    wide_iters: int | None = None
    # label-free copies of the calibration images the blocks also train on (``augmented``):
    # "flip" (mirrored left-right), "shift" (moved half a patch down and right, edges reflected);
    # each keeps the images' statistics and gives the blocks new token contents to fit
    augment: tuple[str, ...] = ()
    span: int = 1  # consecutive blocks trained as one unit (``spans``)
    # how quantized weights train: "ste" (latent weights through straight-through rounding) or
    # "adaround" (each code its floor or ceiling, a learned gate; ``adaround``): the loss is then
    # the block loss over its first value plus round_weight x the gates' penalty
    rounding: str = "ste"
    round_weight: float = 0.01
    lr_rounding: float = 1e-2
    name = "block_reconstruction"

    @property
    def image_passes(self) -> float:
        """The Fisher pass (forward and backward), and each block's quantized pass after training."""
        return 8.0 if self.fisher else 4.0

    def expected_forwards(self, images: int) -> float:
        """Its passes, and its steps: a step of one image through one of B blocks costs about
        STEP_FORWARDS / B float forwards of the model, so B blocks' ``iters`` steps of ``batch_size``
        images cost STEP_FORWARDS x iters x batch_size, whatever B."""
        return self.image_passes * images + STEP_FORWARDS * self.iters * self.batch_size

    def unit_iters(self, state: CalibState, unit: "_Unit") -> int:
        """This unit's iterations: ``wide_iters`` when all its weights are wider than 4 bits."""
        widths = [state.bits.weight(k) for k in state.inst.weights if unit.owns(k)]
        return self.wide_iters if self.wide_iters is not None and widths and min(widths) > NEAR_FLOAT_ABOVE else self.iters

    def describe(self, state):
        units = spans(_units(state, self.head), self.span)
        counts = sorted({self.unit_iters(state, u) for u in units})
        copies = f" with {'+'.join(self.augment)} copies" if self.augment else ""
        return (f"block reconstruction ({len(units)} units, {'/'.join(map(str, counts))} iterations each, batch "
                f"{self.batch_size}, {len(state.images) * (1 + len(self.augment))} images"
                f"{copies}, "
                f"{'quantized' if self.quantized_weights else 'float'} weights)")

    def run(self, state: CalibState) -> None:
        if self.rounding not in ROUNDINGS:
            raise VitqError(f"unknown rounding '{self.rounding}': use {', '.join(ROUNDINGS)}")
        if self.fisher_at not in ("float", "quantized"):
            raise VitqError(f"unknown fisher_at '{self.fisher_at}': use float or quantized")
        if self.lowrank and not self.fisher:
            raise VitqError("block reconstruction: the rank-one Fisher term (lowrank) needs fisher=True")
        units = spans(_units(state, self.head), self.span)
        if not units:
            state.say("  no transformer blocks found: nothing to reconstruct")
            return
        state.keep_float_reference()
        fp = state.float_model()
        names = [u.name for u in units if u.name != HEAD]
        images = augmented(state.images, self.augment)
        at_quantized = self.fisher and self.fisher_at == "quantized"  # (then no float-pass gradients)
        targets, grads = block_outputs(fp, names, images, self.fisher and not at_quantized,
                                       None if state.stage_deadline is None else BUDGET_GRAD_PASS_BYTES,
                                       self.fisher_temperature)
        if at_quantized:
            for p in fp.parameters():
                p.requires_grad_(False)
            labels = targets[HEAD].argmax(1)
        else:
            del fp
        lrs = {"weights": self.lr_weights, "weight_scales": self.lr_scales, "act_scales": self.lr_scales,
               "biases": self.lr_biases, "rounding": self.lr_rounding}
        gen = torch.Generator().manual_seed(state.options.seed)
        torch.manual_seed(state.options.seed)  # QDrop's masks
        iters = [self.unit_iters(state, u) for u in units]
        defaults = list(iters)
        # under --time-budget (calibrate._run_stages sets the stage's deadline; else None)
        plan = None if state.stage_deadline is None else _Budget(state.stage_deadline, len(units), self.batch_size)
        bar = state.progress(sum(iters), f"calibration: block reconstruction "
                                         f"({'quantized' if self.quantized_weights else 'float'} weights)")
        report = {"units": [u.name for u in units], "iters": [], "loss_before": [], "loss_after": []}
        x = None
        for i, unit in enumerate(units):
            unit_start = time.time()
            if x is None or not (unit.name == HEAD or _follows(units[i - 1].name, unit.first)):
                x, args, kwargs = block_call(state.model, unit.entry, images)
            rows_forward = None
            if unit.name != HEAD:  # (a block next in line takes the same arguments as the one before)
                if unit.first != unit.name and (args or kwargs):
                    raise VitqError("block reconstruction: blocks that take arguments besides their input train "
                                    "one at a time (span 1)")
                rows_forward = block_rows(unit.forward) if plan and not args and not kwargs else None
                unit.forward = bound(unit.forward, args, kwargs)
            y, g = targets.pop(unit.name), grads.pop(unit.name, None)
            if at_quantized and unit.name != HEAD:
                g = quantized_point_grads(fp, unit.name, run_chunked(unit.forward, x), images, labels)
            w = None if g is None else fisher_weights(g)
            rows = None if rows_forward is None or x.shape[1] <= 2 * TRAIN_ROWS else TRAIN_ROWS
            rank_scale = 0.0  # the rank-one term's factor, set from the unit's first loss below

            def fisher_terms(out, idx=slice(None), r=slice(None)):
                """The diagonal term, and (with ``lowrank``) the rank-one term, else None."""
                err = out - y[idx][:, r]
                diag = (w[idx][:, r] * err.pow(2)).mean()
                return diag, (g[idx][:, r] * err).flatten(1).sum(1).pow(2).mean() if self.lowrank else None

            def loss_of(out, idx=slice(None), r=slice(None)):
                if w is None:
                    return F.mse_loss(out, y[idx][:, r])
                diag, projected = fisher_terms(out, idx, r)
                return diag if projected is None else diag + rank_scale * projected

            def step_loss(batch: int):
                idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen).to(x.device)
                if rows is None:
                    return loss_of(unit.forward(x[idx]), idx)
                r = torch.randperm(x.shape[1], generator=gen)[:rows].sort().values.to(x.device)
                return loss_of(rows_forward(x[idx], r), idx, r)

            trainable = _Trainable(state, unit, self.learn, self.drop, self.quantized_weights, self.lr_width,
                                   rounding=self.rounding)
            opt = torch.optim.Adam(trainable.param_groups(lrs))
            seen = slice(None) if plan is None else slice(0, BUDGET_LOSS_IMAGES)  # (a budget: a few images)
            pass_start = time.time()
            out = run_chunked(unit.forward, x[seen])
            if self.lowrank and w is not None:  # the rank-one term starts at lowrank x the diagonal's value
                diag, projected = fisher_terms(out, seen)
                rank_scale = self.lowrank * diag.item() / max(projected.item(), 1e-30)
            report["loss_before"].append(round(loss_of(out, seen).item(), 6))
            del out
            if plan is not None:  # the steps that fit in this unit's share of what is left
                pass_s = (time.time() - pass_start) * len(x) / len(x[seen])  # the pass over every image after it
                n = plan.unit_iters(i, defaults[i], pass_s, lambda b: self._step_seconds(step_loss, b, opt),
                                    state.say, rows, x.shape[1])
                iters[i:] = [n] + [min(d, n) for d in defaults[i + 1:]]  # (the rest: an estimate, for the bar)
                bar.set_total(sum(report["iters"]) + sum(iters[i:]))
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters[i], eta_min=0.0)
            steps_start, done, first = time.time(), 0, None
            for step in range(iters[i]):
                loss = step_loss(self.batch_size if plan is None else plan.batch)
                if trainable.gates:  # AdaRound: the block loss relative to its first, and the penalty
                    first = first or max(loss.item(), 1e-12)
                    beta = adaround.beta_at(step, iters[i])
                    loss = loss / first + (0 if beta is None else self.round_weight * trainable.rounding_penalty(beta))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1, unit=f"{i + 1}/{len(units)}", loss=loss.item())
                done += 1
                if plan is not None and plan.past_share():  # slower steps than measured
                    break
            iters[i] = done
            trainable.write_back()
            x_next = run_chunked(unit.forward, x)
            if plan is not None:
                plan.measured(time.time() - steps_start, done, time.time() - unit_start)
            report["iters"].append(iters[i])
            report["loss_after"].append(round(loss_of(x_next[seen], seen).item(), 6))
            x = x_next
        bar.close()
        stage = "reconstruction" if self.quantized_weights else "float_weight_reconstruction"
        extra = {} if plan is None else {"budget_batch_size": plan.batch, "budget_rows": plan.rows,
                                         "loss_images": BUDGET_LOSS_IMAGES}
        state.recipe.info[stage] = {"batch_size": self.batch_size, "images": len(images),
                                    **({"augment": list(self.augment)} if self.augment else {}),
                                    "drop": self.drop, "loss": "fisher" if self.fisher else "mse",
                                    **({"lowrank": self.lowrank} if self.lowrank else {}),
                                    **({"fisher_temperature": self.fisher_temperature}
                                       if self.fisher and self.fisher_temperature != 1 else {}),
                                    **({"fisher_at": self.fisher_at} if at_quantized else {}),
                                    **({"rounding": self.rounding} if self.rounding != "ste" else {}),
                                    "lr_width": self.lr_width and self.quantized_weights, **extra, **report}

    @staticmethod
    def _step_seconds(step_loss, batch: int, opt) -> float:
        """Time of one training step of ``batch`` images (forward and backward, Adam's step on
        top), to size the units under a time budget; no parameter changes."""
        t = time.time()
        for _ in range(2):
            step_loss(batch).backward()
        opt.zero_grad(set_to_none=True)
        return max(1e-3, (time.time() - t) / 2 * 1.1)


class _Budget:
    """How reconstruction fits its deadline: each unit gets an equal share of the time left after
    the work every unit does outside its steps (its input's pass, measured as it goes); where the
    method's iterations do not fit that share, a smaller batch (down to MIN_BATCH images) buys
    more steps (and holds less memory), and the clock ends a unit's steps at its share."""

    def __init__(self, deadline: float, units: int, batch: int):
        self.deadline, self.units, self.batch, self.rows = deadline, units, batch, None
        self.step_s = self.outside_s = None  # seconds per step; per unit outside its steps
        self.unit_end = deadline

    def unit_iters(self, i: int, iters: int, pass_s: float, step_seconds, say, rows, tokens) -> int:
        """Unit ``i``'s iterations (at most ``iters``); ``pass_s``: its pass over every image."""
        left = self.units - i
        if self.step_s is None:  # the first unit: measure a step of MIN_BATCH images, then of the batch
            self.outside_s, small = pass_s, min(MIN_BATCH, self.batch)
            self.step_s = step_seconds(small)
            share = (self.deadline - time.time() - (left - 1) * self.outside_s) / left
            # the method's batch where its iterations fit (steps cost about their images), else fewer
            self.batch = max(small, min(self.batch, int(small * share / (iters * self.step_s))))
            if self.batch > small:
                self.step_s = step_seconds(self.batch)
            self.rows = rows
        share = (self.deadline - time.time() - (left - 1) * self.outside_s) / left
        self.unit_end = time.time() + share
        n = max(1, min(iters, int(share / self.step_s)))
        if i == 0:
            say(f"  plan: {self.units} units x {n} iterations of {self.step_s:.2f} s (batch {self.batch}"
                f"{f', {rows} of {tokens} token rows per image' if rows else ''}), about {self.outside_s:.0f} s "
                f"per unit besides, {(self.deadline - time.time()) / 60:.1f} minutes left for this stage")
        return n

    def past_share(self) -> bool:
        return time.time() > self.unit_end

    def measured(self, steps_s: float, steps: int, unit_s: float) -> None:
        """A unit's measured seconds per step and outside its steps, for the units left."""
        self.step_s = steps_s / max(steps, 1)
        self.outside_s = max(0.0, unit_s - steps_s)


@dataclass
class OutputTuning(Stage):
    """The whole quantized network trained against the float network's predictions (KL divergence
    of the logits on the calibration images), after block reconstruction: activation and weight
    scales and biases, each weight's codes where the blocks left them. Blocks are each fitted to
    their own float output; this fits what they add up to."""

    iters: int = 100
    batch_size: int = 16
    lr_scales: float = 1e-3
    lr_biases: float = 1e-5
    learn: tuple[str, ...] = ("weight_scales", "act_scales", "biases")
    name = "output_tuning"

    @property
    def image_passes(self) -> float:
        return 2.0  # the float logits, and the loss before and after

    def expected_forwards(self, images: int) -> float:
        return self.image_passes * images + STEP_FORWARDS * self.iters * self.batch_size

    def describe(self, state):
        return f"output tuning ({self.iters} iterations, batch {self.batch_size}, {len(state.images)} images)"

    def run(self, state: CalibState) -> None:
        state.keep_float_reference()
        target = F.log_softmax(run_chunked(state.float_model(), state.images), -1)
        unit = _Unit("model", state.model, lambda k: True)
        trainable = _Trainable(state, unit, self.learn, 0.0, from_float=False)
        opt = torch.optim.Adam(trainable.param_groups({"weights": 0.0, "weight_scales": self.lr_scales,
                                                       "act_scales": self.lr_scales, "biases": self.lr_biases}))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iters, eta_min=0.0)
        gen = torch.Generator().manual_seed(state.options.seed)

        def kl(logits, idx=slice(None)):
            return F.kl_div(F.log_softmax(logits, -1), target[idx], log_target=True, reduction="batchmean")

        before = kl(run_chunked(state.model, state.images)).item()
        bar = state.progress(self.iters, "calibration: output tuning")
        for _ in range(self.iters):
            idx = torch.randint(0, len(state.images), (min(self.batch_size, len(state.images)),), generator=gen)
            loss = kl(state.model(state.images[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update(1, loss=loss.item())
        bar.close()
        trainable.write_back()
        after = kl(run_chunked(state.model, state.images)).item()
        state.recipe.info[self.name] = {"iters": self.iters, "batch_size": self.batch_size,
                                        "kl_before": round(before, 6), "kl_after": round(after, 6)}
