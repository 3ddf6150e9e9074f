"""Quantizer kinds: one module each, registered by name.

A kind owns everything a quantized activation means: fitting its parameters on calibration data,
the fake-quant in float (exact, as the exported graph computes it, or differentiable with
straight-through rounding for reconstruction), the simulation of the integer matmul it feeds,
and the passes that deploy it. The recipe stores each quantizer as (kind, bits, params) and
``get_kind`` is the one place that turns a kind's name into its behaviour: a new quantizer is a
new module here plus its pass, and nothing else dispatches on the name.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ...errors import VitqError
from ... import runtime_kernels

KINDS: dict[str, "QuantizerKind"] = {}


class QuantizerKind:
    """Base of every activation quantizer kind; subclasses register one instance each."""

    name = ""
    params: tuple[str, ...] = ()  # the kind's parameters in the recipe, each a scalar per tensor
    learnable: tuple[str, ...] = ()  # parameters block reconstruction may train
    # the simulation's (onnxruntime) softmax kernel when this kind quantizes a softmax output
    sim_softmax: Callable = staticmethod(runtime_kernels.softmax)

    def fit(self, x: torch.Tensor, bits: int, point) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fake(self, x: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """Quantize-dequantize with the deployed model's arithmetic."""
        raise NotImplementedError

    def fake_ste(self, x: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """The same values, differentiable in ``x`` and ``params`` (straight-through rounding)."""
        raise NotImplementedError

    def step(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value of one code step, for quantizers on an affine integer grid."""
        raise VitqError(f"a {self.name} quantizer can only quantize the output of a Softmax")

    def exact_matmul(self, qa, qb):
        """Simulation of ``a @ b`` with ``a`` of this kind and ``b`` uniform: exact integer sums."""
        s_a, s_b = self.step(torch_params(qa)), get_kind(qb.kind).step(torch_params(qb))
        return lambda a, b: integer_matmul(fake(qa, a), fake(qb, b), s_a, s_b)

    def deploy_passes(self, keys: list[str]) -> list:
        """The graph passes that deploy quantizers of this kind at ``keys``."""
        raise NotImplementedError

    def to_numpy(self, params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: np.asarray(params[k].detach().cpu(), np.float32).reshape(()) for k in self.params}

    def check(self, key: str, bits: int, params: dict[str, np.ndarray]) -> None:
        """A recipe entry is valid: exactly this kind's parameters, finite scalars, bits in range."""
        if sorted(params) != sorted(self.params):
            raise VitqError(f"{key}: a {self.name} quantizer has parameters {list(self.params)}, "
                            f"recipe gives {sorted(params)}")
        if not 2 <= bits <= 8:
            raise VitqError(f"{key}: {bits} bits, expected 2..8")
        bad = [k for k, v in params.items() if np.asarray(v).size != 1 or not np.isfinite(v).all()]
        if bad:
            raise VitqError(f"{key}: parameter '{bad[0]}' is not one finite number")


def register(cls: type[QuantizerKind]) -> type[QuantizerKind]:
    """Class decorator: one instance of each kind serves every quantizer of that kind."""
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> QuantizerKind:
    if name not in KINDS:
        raise VitqError(f"unknown quantizer kind '{name}': known are {', '.join(KINDS)}")
    return KINDS[name]


def torch_params(q, device=None) -> dict[str, torch.Tensor]:
    """A recipe ActQuant's parameters as float32 scalar tensors (on ``device``)."""
    return {k: torch.tensor(float(np.asarray(v).reshape(())), dtype=torch.float32, device=device)
            for k, v in q.params.items()}


def fake(q, x: torch.Tensor) -> torch.Tensor:
    """What a recipe ActQuant makes of ``x`` in the deployed model."""
    return get_kind(q.kind).fake(x, torch_params(q), q.bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def integer_matmul(a, b, step_a, step_b) -> torch.Tensor:
    """float32(exact sum of integer products) * (step_a * step_b), as the integer kernels compute."""
    return (torch.round(a / step_a).double() @ torch.round(b / step_b).double()).float() * (step_a * step_b)


def by_kind(activations: dict) -> list[tuple[QuantizerKind, list[str]]]:
    """(kind, keys) for every kind a recipe uses, in registration order (uniform first)."""
    return [(kind, keys) for kind in KINDS.values()
            if (keys := [k for k, q in activations.items() if q.kind == kind.name])]


from . import uniform, log2, sulq  # noqa: E402,F401  (registers the kinds)
