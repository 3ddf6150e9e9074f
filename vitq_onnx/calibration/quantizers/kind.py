"""The quantizer kind base and its registry (``register``, ``get_kind``), with the exact integer
matmul every kind's simulation uses.

A kind's calibration behaviour: fitting its parameters on calibration data, the fake-quant in
float (exact, as the exported graph computes it, or differentiable with straight-through rounding
for reconstruction) and the simulation of the integer matmul it feeds. Its recipe parameters and
their checks are its torch-free spec (``codes/spec.py``), its graph rewrite is registered on the
pass side (``passes/deploy.py``); ``get_kind`` is the one place here that turns a kind's name into
its behaviour.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ...codes.spec import get_spec
from ...errors import VitqError
from ... import runtime_kernels

KINDS: dict[str, "QuantizerKind"] = {}


class QuantizerKind:
    """Base of every activation quantizer kind; subclasses register one instance each."""

    name = ""
    learnable: tuple[str, ...] = ()  # parameters block reconstruction may train
    # the simulation's (onnxruntime) softmax kernel when this kind quantizes a softmax output
    sim_softmax: Callable = staticmethod(runtime_kernels.softmax)

    @property
    def params(self) -> tuple[str, ...]:
        """The kind's parameters in the recipe, each a scalar per tensor (its spec's)."""
        return get_spec(self.name).params

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

    def codes(self, x: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """``fake(x) / step`` as integer-valued floats: what an integer kernel multiplies."""
        return torch.round(self.fake(x, params, bits) / self.step(params))

    def exact_matmul(self, qa, qb):
        """Simulation of ``a @ b`` with ``a`` of this kind and ``b`` uniform: exact integer sums."""
        p_a, kind_b, p_b = torch_params(qa), get_kind(qb.kind), torch_params(qb)
        unit = self.step(p_a) * kind_b.step(p_b)
        return lambda a, b: exact_sum_matmul(self.codes(a, p_a, qa.bits), kind_b.codes(b, p_b, qb.bits)) * unit

    def to_numpy(self, params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: np.asarray(params[k].detach().cpu(), np.float32).reshape(()) for k in self.params}

    def check(self, key: str, bits: int, params: dict[str, np.ndarray]) -> None:
        get_spec(self.name).check(key, bits, params)


def register(cls: type[QuantizerKind]) -> type[QuantizerKind]:
    """Class decorator: one instance of each kind serves every quantizer of that kind."""
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> QuantizerKind:
    get_spec(name)  # a name the recipe cannot hold is one error, wherever it is asked
    return KINDS[name]


def kind_for(role: str, bits: int, softmax_kind: Callable[[int], str]) -> str:
    """The one rule that picks a tensor's quantizer kind: a post-Softmax tensor takes the method's
    ``softmax_kind`` at its width, every other activation is uniform."""
    return softmax_kind(bits) if role == "softmax" else "uniform"


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


FLOAT32_EXACT = 2**24  # every integer up to this magnitude is a float32


def exact_sum_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 of the exact ``a @ b`` of integer-valued tensors, at float32 GEMM speed.

    A float32 GEMM sums integers exactly, in any order, while every partial sum stays within
    2^24, which holds when each row's sum of |a| times max |b| does (attention probabilities and
    most activations are far from their worst case). Otherwise the inner axis is cut into pieces
    short enough for the worst case (length * max|a| * max|b|) and their exact sums are added in
    float64, which holds any such total.
    """
    if not a.numel() or not b.numel():
        return a.float() @ b.float()
    if torch.get_float32_matmul_precision() != "highest":  # a GEMM that may round its inputs
        return (a.double() @ b.double()).float()
    max_b = _absmax(b)
    # (strictly below: a row sum under 2^24 is itself exact in float32, so the test is too)
    if float(torch.linalg.vector_norm(a.float(), 1, dim=-1).amax()) * max_b < FLOAT32_EXACT:
        return a.float() @ b.float()
    piece = int(FLOAT32_EXACT // max(_absmax(a) * max_b, 1.0))
    if piece < 1:  # one product alone is beyond float32
        return (a.double() @ b.double()).float()
    total = None
    for i in range(0, a.shape[-1], piece):
        part = (a[..., i:i + piece].float() @ b[..., i:i + piece, :].float()).double()
        total = part if total is None else total + part
    return total.float()


def _absmax(x: torch.Tensor) -> float:
    lo, hi = torch.aminmax(x)  # no |x| temporary
    return max(-float(lo), float(hi))


def integer_matmul(a, b, step_a, step_b) -> torch.Tensor:
    """float32(exact sum of integer products) * (step_a * step_b), as the integer kernels compute."""
    return exact_sum_matmul((a / step_a).round_(), (b / step_b).round_()) * (step_a * step_b)

