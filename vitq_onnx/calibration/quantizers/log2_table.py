"""Post-Softmax log quantizer with every code used: m levels per octave on an integer grid.

Why: RepQ-ViT's log-sqrt(2) quantizer (``log2.py``) deploys as shifts of uint8 integers, so it
keeps at most 16 levels whatever the width, and at 6 bits its sqrt(2) step near 1 is the model's
largest error (``vitq-onnx report`` on an ``ias`` W6/A6 DeiT-Ti: 6-10 dB on the middle blocks'
attention maps, above 21 dB on every other tensor). Here all 2^b codes count: code k stands for
scale * L_k / 2^14 with the integer L_k = round(exp((14 - k/m) ln 2 + offset)), about 2^14 *
2^(-k/m), and the top code's level is 0; the fit chooses the spacing m (levels per octave: as
AdaLog adapts its log base) with the scale, by the error of the attention output. The offset
(0 or a few 2^-12 below) keeps every level far from a rounding tie, so the graph's Exp rounds
to the same integers on any CPU.

Deployment (``passes/log2_table_softmax.py``): codes from LogSoftmax as log2's are (a
QuantizeLinear by ln(2)/m); ``ort`` makes L_k with DequantizeLinear, Add, Exp and Round and
multiplies it with v's codes in a float32 GEMM, exact because the fit keeps the scale high
enough that no row's sum reaches 2^24; ``qdq`` (and ``ort`` where v's codes are wider than that
allows) reads L_k's two 7-bit digits from 2^b-entry tables (Gather) into two integer GEMMs
added in int32. One float unit after either.
"""

from __future__ import annotations

import math

import torch

from ... import runtime_kernels
from ...codes import log2_table as C
from ...codes.log2_table import GRID_BITS, smallest_scale, spacings, table_step
from .kind import QuantizerKind, exact_sum_matmul, get_kind, register, round_ste, torch_params
from .log2 import log2_log_scale, log_codes_of_log
from .search import attention_sample


def table_levels(bits: int, per_octave: int) -> torch.Tensor:
    """L_k for every code k (int64), about 2^14 * 2^(-k/m) (``codes/log2_table.py``)."""
    return torch.from_numpy(C.table_levels(bits, per_octave))


def table_codes_of_log(log_x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    return log_codes_of_log(log_x, log2_log_scale(scale), torch.tensor(table_step(per_octave)), 2**bits - 1)


def fake_table(x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    levels = table_levels(bits, per_octave).to(x.device).float() * (2.0**-GRID_BITS) * float(scale)
    return levels[table_codes_of_log(torch.log(x.float()), scale, bits, per_octave).long()]


def fit_table(x: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Spacing and scale (the maximum or up to two octaves below it, never below
    ``smallest_scale``) with the least error of ``x @ v`` (attention's output), or of ``x`` itself
    without ``v``."""
    top = float(x.max().clamp(min=1e-8))
    xs, vs = attention_sample(x, v)
    ref = xs if v is None else xs @ vs
    best, best_err = None, math.inf
    for m in spacings(bits):
        for i in range(32):
            scale = max(top * 2.0 ** (-i / 16.0), smallest_scale(m))
            xq = fake_table(xs, scale, bits, m)
            err = float((((xq if v is None else xq @ vs) - ref) ** 2).mean())
            if err < best_err:
                best, best_err = (scale, m), err
    return {"scale": torch.tensor(best[0], dtype=torch.float32), "per_octave": torch.tensor(float(best[1]))}


@register
class Log2Table(QuantizerKind):
    name = "log2-table"
    learnable = ("scale",)
    sim_softmax = staticmethod(runtime_kernels.log_softmax)  # the graph quantizes LogSoftmax's output

    def fit(self, x, bits, point):
        return fit_table(x, bits, point.partner)

    def fake(self, x, params, bits):
        return fake_table(x, params["scale"], bits, int(params["per_octave"]))

    def fake_ste(self, x, params, bits):
        scale, m = params["scale"], int(params["per_octave"])
        log_x = torch.log(x.clamp(min=torch.finfo(x.dtype).tiny))  # exact zeros take the zero code
        codes = torch.clamp(round_ste((torch.log(scale) - log_x) / torch.tensor(table_step(m), device=x.device)), 0,
                            2**bits - 1)
        smooth = torch.where(codes < 2**bits - 1, scale * torch.exp2(-codes / m), torch.zeros_like(x))
        exact = table_levels(bits, m).to(x.device).float()[codes.detach().long()] * (2.0**-GRID_BITS) * scale
        return smooth + (exact - smooth).detach()  # the deployed values, the gradient of 2^(-k/m)

    def exact_matmul(self, qa, qb):
        """The exact sum of each code's level L times v's codes, float32 of it times one unit: the
        ``ort`` graph's float GEMM (exact below 2^24) and ``qdq``'s two integer GEMMs of L's digits
        added in int32 both compute it."""
        p, kind_b, params_b = torch_params(qa), get_kind(qb.kind), torch_params(qb)
        m = int(p["per_octave"])
        levels, unit = table_levels(qa.bits, m), torch.tensor(C.table_unit(p["scale"], kind_b.step(params_b)))

        def table_matmul(log_a, b):
            codes = table_codes_of_log(log_a, p["scale"], qa.bits, m).long()
            return exact_sum_matmul(levels.to(codes.device)[codes].float(), kind_b.codes(b, params_b, qb.bits)) * unit

        return table_matmul

