"""Post-Softmax log quantizer with every code used: m levels per octave, deployed by table lookup.

Why: RepQ-ViT's log-sqrt(2) quantizer (``log2.py``) deploys as shifts of uint8 integers, so it
keeps at most 16 levels whatever the width, and at 6 bits its sqrt(2) step near 1 is the model's
largest error (``vitq-onnx report`` on an ``ias`` W6/A6 DeiT-Ti: 6-10 dB on the middle blocks'
attention maps, above 21 dB on every other tensor). Here all 2^b codes count: code k < Z stands
for scale * L_k / 2^14 with the integer L_k = round(2^14 * 2^(-k/m)), the top code Z for exact
zero; the fit chooses the spacing m (levels per octave, 1, 2, 4 or 8: as AdaLog adapts its log
base) with the scale, by the error of the attention output.

Deployment (``passes/log2_table_softmax.py``): codes from LogSoftmax as log2's are (a
QuantizeLinear by ln(2)/m), then per 7-bit digit of L_k = 128 * high + low a Gather from a
2^b-entry table and an integer GEMM with v's codes (both digits at most 128, so u8*s8 product
pairs stay below 2^15 on CPUs without VNNI), each sum times one float unit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import runtime_kernels
from ...errors import VitqError
from . import QuantizerKind, exact_sum_matmul, get_kind, register, round_ste, torch_params
from .log2 import log2_log_scale, log_codes_of_log
from .search import attention_sample

GRID_BITS = 14  # levels are integers L_k <= 2^14 in units of scale * 2^-14
DIGIT_BITS = 7  # L_k = 128 * high + low: two digits of at most 128
PER_OCTAVE = (1, 2, 4, 8)  # the level spacings the fit chooses from


def table_levels(bits: int, per_octave: int) -> torch.Tensor:
    """L_k for every code k (int64): round(2^14 * 2^(-k/m)), and 0 for the top code."""
    k = torch.arange(2**bits, dtype=torch.float64)
    levels = torch.round(2.0**GRID_BITS * torch.exp2(-k / per_octave)).to(torch.int64)
    levels[-1] = 0
    return levels


def table_digits(bits: int, per_octave: int) -> list[torch.Tensor]:
    """[high, low] 7-bit digits of each code's L_k (int64 tables, 2^b entries each)."""
    levels = table_levels(bits, per_octave)
    return [levels >> DIGIT_BITS, levels & (2**DIGIT_BITS - 1)]


def table_step(per_octave: int) -> torch.Tensor:
    """ln(2)/m rounded once to float32: one code in the log domain, the graph's quantization step."""
    return torch.tensor(math.log(2.0) / per_octave, dtype=torch.float32)


def table_codes_of_log(log_x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    return log_codes_of_log(log_x, log2_log_scale(scale), table_step(per_octave), 2**bits - 1)


def digit_units(scale, s_v) -> list[torch.Tensor]:
    """The float value of integer 1 in the [high, low] GEMMs: scale * s_v * 2^-14 * 128^digit,
    rounded once to float32 (the graph's constants)."""
    unit = float(scale) * float(s_v) * 2.0**-GRID_BITS
    return [torch.tensor(np.float32(unit * 2.0**DIGIT_BITS)), torch.tensor(np.float32(unit))]


def fake_table(x: torch.Tensor, scale, bits: int, per_octave: int) -> torch.Tensor:
    levels = table_levels(bits, per_octave).to(x.device).float() * (2.0**-GRID_BITS) * float(scale)
    return levels[table_codes_of_log(torch.log(x.float()), scale, bits, per_octave).long()]


def fit_table(x: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Spacing and scale (the maximum or up to two octaves below it) with the least error of
    ``x @ v`` (attention's output), or of ``x`` itself without ``v``."""
    top = float(x.max().clamp(min=1e-8))
    xs, vs = attention_sample(x, v)
    ref = xs if v is None else xs @ vs
    best, best_err = None, math.inf
    for m in PER_OCTAVE:
        for i in range(32):
            scale = top * 2.0 ** (-i / 16.0)
            xq = fake_table(xs, scale, bits, m)
            err = float((((xq if v is None else xq @ vs) - ref) ** 2).mean())
            if err < best_err:
                best, best_err = (scale, m), err
    return {"scale": torch.tensor(best[0], dtype=torch.float32), "per_octave": torch.tensor(float(best[1]))}


@register
class Log2Table(QuantizerKind):
    name = "log2-table"
    params = ("scale", "per_octave")
    learnable = ("scale",)
    sim_softmax = staticmethod(runtime_kernels.log_softmax)  # the graph quantizes LogSoftmax's output

    def fit(self, x, bits, point):
        return fit_table(x, bits, point.partner)

    def fake(self, x, params, bits):
        return fake_table(x, params["scale"], bits, int(params["per_octave"]))

    def fake_ste(self, x, params, bits):
        scale, m = params["scale"], int(params["per_octave"])
        log_x = torch.log(x.clamp(min=torch.finfo(x.dtype).tiny))  # exact zeros take the zero code
        codes = torch.clamp(round_ste((torch.log(scale) - log_x) / table_step(m).to(x.device)), 0, 2**bits - 1)
        smooth = torch.where(codes < 2**bits - 1, scale * torch.exp2(-codes / m), torch.zeros_like(x))
        exact = table_levels(bits, m).to(x.device).float()[codes.detach().long()] * (2.0**-GRID_BITS) * scale
        return smooth + (exact - smooth).detach()  # the deployed values, the gradient of 2^(-k/m)

    def exact_matmul(self, qa, qb):
        """Per digit: the exact sum of its table's integers times v's codes, float32 of it times the
        digit's unit, added high then low, as the graph's GEMMs compute it."""
        p, kind_b, params_b = torch_params(qa), get_kind(qb.kind), torch_params(qb)
        m = int(p["per_octave"])
        digits = table_digits(qa.bits, m)
        units = digit_units(p["scale"], kind_b.step(params_b))

        def table_matmul(log_a, b):
            codes = table_codes_of_log(log_a, p["scale"], qa.bits, m).long()
            kv = kind_b.codes(b, params_b, qb.bits)
            out = None
            for digit, unit in zip(digits, units):
                term = exact_sum_matmul(digit.to(codes.device)[codes].float(), kv) * unit
                out = term if out is None else out + term
            return out

        return table_matmul

    def check(self, key, bits, params):
        super().check(key, bits, params)
        if not float(np.asarray(params["scale"])) > 0 or float(np.asarray(params["per_octave"])) not in PER_OCTAVE:
            raise VitqError(f"{key}: log2-table scale must be > 0 and per_octave one of {PER_OCTAVE}")

    def deploy_passes(self, keys):
        from ...passes.log2_table_softmax import Log2TableSoftmax
        return [Log2TableSoftmax(keys)]
