"""RepQ-ViT's log-sqrt(2) post-Softmax quantizer, deployed in base 2 as shifts.

Codes 0..Z-1 stand for scale * 2^(-code/2) and the top code Z for exactly zero. The graph
(``passes/log2_softmax.py``) turns each code into integer shifts and multiplies them with v's
codes in two integer GEMMs; the simulation below reproduces that arithmetic bit for bit.
"""

from __future__ import annotations


import torch

from ... import runtime_kernels
from ...codes import log2 as C
from ...codes.log2 import log2_max_exponent, log2_unit, log2_zero_code
from .kind import QuantizerKind, exact_sum_matmul, get_kind, register, round_ste, torch_params
from .search import attention_sample, sample

SQRT2 = torch.tensor(C.SQRT2)
LOG2_STEP = torch.tensor(C.LOG2_STEP)  # one code = ln(sqrt(2)), float32


def log2_log_scale(scale) -> torch.Tensor:
    """ln(scale) rounded once to float32: the constant the graph subtracts from ln(x)."""
    return torch.tensor(C.log2_log_scale(scale))


def log2_codes_of_log(log_x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """log-sqrt(2) codes round((ln(scale) - ln(x)) / ln(sqrt(2))) in float32, clamped to [0, Z].

    The graph computes LogSoftmax, Sub, then a QuantizeLinear by ln(sqrt(2)) (round half to even,
    saturating to uint8) and a Min with Z; the simulation feeds onnxruntime's LogSoftmax here so
    both round the same values.
    """
    return log_codes_of_log(log_x, log2_log_scale(scale), LOG2_STEP, log2_zero_code(bits))


def log_codes_of_log(log_x: torch.Tensor, ln_scale: torch.Tensor, step: torch.Tensor, zero_code: int) -> torch.Tensor:
    """round((ln_scale - ln(x)) / step) clamped to [0, zero_code], in float32 as the graph's Sub,
    QuantizeLinear and Min compute it (the log-domain codes every log quantizer here shares)."""
    codes = ln_scale.to(log_x.device) - log_x.float()
    return codes.div_(step.to(log_x.device)).round_().clamp_(0, zero_code)


def log2_codes(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    return log2_codes_of_log(torch.log(x.float()), scale, bits)


def log2_parts(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (shifted, odd), as float32: shifted = 2^E >> ceil(q/2), odd = shifted where q is
    odd, else 0.

    Code q stands for scale * 2^(-q/2) = unit * (shifted + (sqrt(2) - 1) * odd), unit = scale * 2^-E:
    the log-sqrt(2) quantizer reparameterized to base 2, so the integers are plain shifts and the
    irrational factor sits in one float constant. The zero code Z shifts 2^E right by more than E
    bits, which gives exactly 0.
    """
    q = codes.float()  # small integers, all exact in float32 (half the memory of int64, float GEMMs)
    half_up = torch.floor((q + 1) / 2)
    shift = log2_max_exponent(bits) - half_up
    shifted = torch.where(shift >= 0, torch.exp2(shift), torch.zeros_like(q))
    return shifted, shifted * (2 * half_up - q)


def log2_dequant(codes: torch.Tensor, scale, bits: int) -> torch.Tensor:
    shifted, odd = log2_parts(codes, bits)
    unit = log2_unit(scale, bits)
    return shifted.float() * unit + odd.float() * (unit * (SQRT2.to(codes.device) - 1))


def fake_log2(x, scale, bits: int):
    """``log2_dequant`` of the codes, looked up in a table of its Z + 1 values: the same numbers at a
    fraction of the cost on attention maps of millions of entries."""
    levels = log2_dequant(torch.arange(log2_zero_code(bits) + 1, device=x.device), scale, bits)
    return levels[log2_codes(x, scale, bits).long()]


def fit_log2(x: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> torch.Tensor:
    """Scale for the log2 quantizer: the maximum, or up to two octaves below it.

    With ``v`` (the values the probabilities multiply) the score is the error of ``x @ v``, what
    attention actually outputs; small probabilities matter there in bulk, not one by one.
    """
    top = x.max().clamp(min=1e-8)
    candidates = top * 2.0 ** (-torch.arange(32, device=x.device) / 16.0)
    if v is None:
        s = sample(x)
        errs = [((fake_log2(s, c, bits) - s) ** 2).mean() for c in candidates]
    else:
        xs, vs = attention_sample(x, v)
        ref = xs @ vs
        errs = [((fake_log2(xs, c, bits) @ vs - ref) ** 2).mean() for c in candidates]
    return candidates[torch.stack(errs).argmin()].reshape(()).cpu()


@register
class Log2(QuantizerKind):
    name = "log2"
    learnable = ("scale",)
    sim_softmax = staticmethod(runtime_kernels.log_softmax)  # the graph quantizes LogSoftmax's output

    def fit(self, x, bits, point):
        return {"scale": fit_log2(x, bits, point.partner)}

    def fake(self, x, params, bits):
        return fake_log2(x, params["scale"], bits)

    def fake_ste(self, x, params, bits):
        scale = params["scale"]
        # exact zeros (masked attention, e.g. Swin's shifted windows) take the zero code; the
        # clamp keeps log() finite so that no NaN reaches the gradient through the other branch
        log_x = torch.log(x.clamp(min=torch.finfo(x.dtype).tiny))
        codes = torch.clamp(round_ste((torch.log(scale) - log_x) / LOG2_STEP.to(x.device)), 0, log2_zero_code(bits))
        return torch.where(codes < log2_zero_code(bits), scale * torch.exp2(-codes / 2), torch.zeros_like(x))

    def exact_matmul(self, qa, qb):
        """``a`` is onnxruntime's LogSoftmax output (``sim_softmax``), as in the graph."""
        kind_b, params_b = get_kind(qb.kind), torch_params(qb)
        s_a, s_b = torch_params(qa)["scale"], kind_b.step(params_b)
        unit = log2_unit(s_a, qa.bits) * s_b
        unit_odd = unit * (SQRT2 - 1)

        def log2_matmul(log_a, b):
            shifted, odd = log2_parts(log2_codes_of_log(log_a, s_a, qa.bits), qa.bits)
            kv = kind_b.codes(b, params_b, qb.bits)
            return exact_sum_matmul(shifted, kv) * unit + exact_sum_matmul(odd, kv) * unit_odd

        return log2_matmul
