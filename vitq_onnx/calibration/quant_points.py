"""Quant points on a timm model: where tensors are quantized, addressed by recipe keys.

Linear and Conv inputs get forward pre-hooks; attention modules get their family's forward
(``families/``: timm's non-fused path, same ops, same order, so the exported graph is unchanged)
with the four matmul inputs passed through quant points (``attend``). A point does nothing until
calibration or simulation gives it an action.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .act_matmuls import instrumented
from ..families import FAMILIES
from ..naming import AV, QK, attention_nodes, conv_node, linear_node, norm_node
from ..recipe import tensor_key


class QuantPoint:
    """One quantized tensor. ``action(point, x) -> x'`` is set by calibration or simulation."""

    def __init__(self, key: str, role: str):
        self.key, self.role = key, role
        self.partner: Optional[torch.Tensor] = None
        self.action: Optional[Callable[["QuantPoint", torch.Tensor], torch.Tensor]] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.action is None else self.action(self, x)


class QuantMatMul:
    """An activation-by-activation matmul with a quant point on each input.

    Calibration quantizes the inputs and multiplies in float; the simulation sets ``exact`` to
    reproduce the exported integer arithmetic bit for bit.
    """

    def __init__(self, node: str, role_a: str, role_b: str):
        self.node = node
        self.a, self.b = QuantPoint(tensor_key(node, 0), role_a), QuantPoint(tensor_key(node, 1), role_b)
        self.exact: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor, a_quantized: bool = False,
                 b_quantized: bool = False) -> torch.Tensor:
        """``a @ b`` through both points, except an input the caller already passed through its own."""
        if self.exact is not None:
            return self.exact(a, b)
        b = b if b_quantized else self.b(b)
        if not a_quantized:
            self.a.partner = b  # lets calibration score a's quantizer by the product it feeds
            a = self.a(a)
            self.a.partner = None  # (a view of b would keep the whole layer's qkv output alive)
        with instrumented():
            return a @ b


@dataclass
class Instrumented:
    """What ``instrument`` attached: activation points, quantized weights, LayerNorm->Linear pairs,
    and the layers kept float (``float_layers``: Linear/Conv2d by module name; ``float_matmuls``:
    attention matmuls, by the names ``<attention>.matmul_qk``/``.matmul_av``)."""

    points: dict[str, QuantPoint] = field(default_factory=dict)
    weights: dict[str, nn.Module] = field(default_factory=dict)  # weight key -> Linear/Conv2d
    matmuls: list[QuantMatMul] = field(default_factory=list)
    post_norm: list[tuple[str, nn.LayerNorm, list[str], list[nn.Linear]]] = field(default_factory=list)
    float_layers: dict[str, nn.Module] = field(default_factory=dict)
    float_matmuls: dict[str, QuantMatMul] = field(default_factory=dict)
    families: set[str] = field(default_factory=set)  # the families whose attention the model has

    def float_ops(self) -> list[str]:
        """Those families' float pieces (``Family.float_ops``), in registry order."""
        return [op for f in FAMILIES.values() if f.name in self.families for op in f.float_ops]

    def set_action(self, action, keys=None) -> None:
        for key, point in self.points.items():
            if keys is None or key in keys:
                point.action = action


ATTENTION_CHUNK = 2**25  # attention-map elements computed at once: bounded memory at any token count


def _chunks(batch: int, per_item: int, align: int = 1) -> list[slice]:
    """Slices of the batch axis holding at most ATTENTION_CHUNK elements (at least ``align`` items)."""
    step = max(1, ATTENTION_CHUNK // max(per_item * align, 1)) * align
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _float_pass(*matmuls: QuantMatMul) -> bool:
    """Nothing quantizes these matmuls (no point action, no exact kernel)."""
    return all(mm.exact is None and mm.a.action is None and mm.b.action is None for mm in matmuls)


def attend(self, q, k, v, adjust=None, align: int = 1, mix=None):
    """softmax(q @ k^T, adjusted) @ v over slices of the batch, so that an attention map of
    thousands of tokens never exists for every image at once; q, k and v pass their quant points
    on the whole batch (their fits see every image), the attention map in slices (its fit sees
    the first slice). ``align``: slices hold whole multiples of it (Swin's windows per image).
    ``mix`` maps the probabilities before they meet v (talking heads' Linear across heads): the
    first input of attn @ v is then ``mix``'s output, which the family's forward says by its
    ``av_role`` (see ``instrument``)."""
    qk, av = self.vq_qk, self.vq_av
    parts = _chunks(q.shape[0], q.shape[1] * q.shape[2] * k.shape[-2], align)
    if len(parts) > 1 and adjust is None and mix is None and _float_pass(qk, av):
        # a map too large to hold, in a pass that quantizes nothing here (RepQ-ViT's float ranges):
        # the fused kernel, which never holds it at all (q is already scaled)
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    k_t = k.transpose(-2, -1)
    calibrating = qk.exact is None
    drop = getattr(self, "attn_drop", None) or (lambda probs: probs)  # (timm's; others may have none)
    if calibrating:
        k_t, q, v = qk.b(k_t), qk.a(q), av.b(v)

    def one_slice(q, k_t, v):
        attn = qk(q, k_t, calibrating, calibrating)
        attn = attn if adjust is None else adjust(attn)
        probs = self.vq_softmax(attn)
        return av(drop(probs if mix is None else mix(probs)), v, b_quantized=calibrating)

    if len(parts) == 1:  # the whole batch (always so for the ONNX export's one image: no Slice in the graph)
        return one_slice(q, k_t, v)
    return torch.cat([one_slice(q[part], k_t[part], v[part]) for part in parts])


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return x.softmax(dim=-1)


def _input_hook(point: QuantPoint):
    def hook(_module, args):
        return (point(args[0]),) + tuple(args[1:])

    return hook


def _attention_forward(module: nn.Module):
    """The first registered family that claims ``module`` and its quant-point forward, or (None, None)."""
    for family in FAMILIES.values():
        forward = family.attention_forward(module)
        if forward is not None:
            return family, forward
    return None, None


def _post_norm_pairs(model: nn.Module):
    """(LayerNorm name, LayerNorm, Linear names, Linears) whose Linears read only that norm, as the
    families declare them for their blocks: one Linear path, or a tuple of paths that all read the
    norm, the widest reader first (its input's ranges are fitted); every path declared for one norm
    makes one entry, folded once into all of them (separate q/k/v projections)."""
    pairs: dict[str, tuple[nn.LayerNorm, list[str], list[nn.Linear]]] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        for norm_attr, paths in (p for family in FAMILIES.values() for p in family.norm_linear_pairs(mod)):
            paths = (paths,) if isinstance(paths, str) else tuple(paths)
            norm = getattr(mod, norm_attr, None)
            linears = [mod.get_submodule(path) if _has(mod, path) else None for path in paths]
            if isinstance(norm, nn.LayerNorm) and linears and all(isinstance(lin, nn.Linear) for lin in linears):
                _, names, found = pairs.setdefault(prefix + norm_attr, (norm, [], []))
                names.extend(prefix + path for path in paths)
                found.extend(linears)
    return [(name, norm, names, linears) for name, (norm, names, linears) in pairs.items()]


def keeps_float(name: str, patterns) -> list[str]:
    """The glob patterns that match module ``name`` or a module it is part of (``blocks.3.attn``
    keeps ``blocks.3.attn.qkv`` float)."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [p for p in patterns if any(fnmatchcase(s, p) for s in scopes)]


def _has(mod: nn.Module, path: str) -> bool:
    try:
        mod.get_submodule(path)
        return True
    except AttributeError:
        return False


def instrument(model: nn.Module, keep_float: tuple[str, ...] | list[str] = ()) -> Instrumented:
    """Attach quant points to every Linear/Conv2d input and every attention matmul input, except
    in the layers whose module name (or a parent's) matches a ``keep_float`` glob."""
    inst = Instrumented()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or isinstance(mod, nn.Conv2d):
            if keeps_float(name, keep_float):
                inst.float_layers[name] = mod
                continue
            node = linear_node(name) if isinstance(mod, nn.Linear) else conv_node(name)
            point = QuantPoint(tensor_key(node, 0), "conv_input" if isinstance(mod, nn.Conv2d) else "linear_input")
            mod.register_forward_pre_hook(_input_hook(point))
            inst.points[point.key] = point
            inst.weights[tensor_key(node, 1)] = mod
        family, forward = _attention_forward(mod)
        if forward is not None:
            inst.families.add(family.name)
            mod.fused_attn = False
            qk, av = attention_nodes(name)
            # attn @ v's first input: the Softmax's output, unless the forward mixes it first (talking
            # heads: ``av_role = "attn"``, a general activation that the post-Softmax kinds cannot take)
            mod.vq_qk, mod.vq_av = QuantMatMul(qk, "q", "k"), QuantMatMul(av, getattr(forward, "av_role", "softmax"), "v")
            mod.vq_softmax = _softmax
            mod.vq_attend = types.MethodType(attend, mod)
            for mm, op in ((mod.vq_qk, QK), (mod.vq_av, AV)):
                if keeps_float(f"{name}.{op}", keep_float):
                    inst.float_matmuls[f"{name}.{op}"] = mm
                    continue
                inst.matmuls.append(mm)
                inst.points[mm.a.key], inst.points[mm.b.key] = mm.a, mm.b
            mod.forward = types.MethodType(forward, mod)
    inst.post_norm = [(norm_node(n), norm, [linear_node(x) for x in lnames], linears)
                      for n, norm, lnames, linears in _post_norm_pairs(model)
                      if not any(x in inst.float_layers for x in lnames)]
    return inst
