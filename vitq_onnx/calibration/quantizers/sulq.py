"""I&S-ViT's shift-uniform-log2 quantizer (SULQ) for post-Softmax tensors, deployed as shifts.

Code k = clamp(round((log2(x + eta) - lo) / delta), 0, 2^b - 1) stands for 2^e_k - eta with the
integer exponent e_k = round(lo + k * delta): a uniform grid on log2(x + eta), so the levels cover
[0, 1] down to exact zero (x + eta > 0 always) with 2^b honest codes. With eta = 2^-j every level
is eta * (2^i - 1), i = e_k + j in 0..15: the graph (``passes/sulq_softmax.py``) looks each code's
shift up in a 2^b-entry table, makes 2^i with a BitShift, and multiplies with v's codes in an
integer GEMM with zero point 1 (2^i - 1); 2^i above 2^7 goes to a second uint8 GEMM weighted 256.
One float scale eta * s_v follows. A free eta (the paper's grid) is kept for comparison only: its
levels are not integer multiples of one step, so it runs in the simulation but not in the graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import runtime_kernels
from ...codes import sulq as C
from ...codes.sulq import PART_BITS, graph_constants
from .kind import QuantizerKind, exact_sum_matmul, get_kind, register, round_ste, torch_params
from .search import attention_sample

SHIFTS = tuple(range(11))  # the fitted grid eta = 2^-j, j = 0..10: the paper's range 0.001 ... 1
FREE_ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)  # the paper's grid


def sulq_exponents(lo, delta, bits: int) -> torch.Tensor:
    """e_k = round(lo + k * delta) for every code k (int64, fixed once the parameters are)."""
    return torch.from_numpy(C.sulq_exponents(lo, delta, bits))


def sulq_codes_of_log(ln_x: torch.Tensor, lo, delta, bits: int) -> torch.Tensor:
    """Codes from ln(x + eta) in float32, as the graph's Sub, QuantizeLinear (round half to even,
    saturating at 0) and Min compute them."""
    c_lo, c_delta = (torch.tensor(c, device=ln_x.device) for c in graph_constants(lo, delta))
    return torch.clamp(torch.round((ln_x.float() - c_lo) / c_delta), 0, 2**bits - 1)


def sulq_log(x: torch.Tensor, eta) -> torch.Tensor:
    """ln(x + eta) with onnxruntime's Log kernel (the graph's Add, then Log)."""
    return runtime_kernels.run("Log", x.float() + torch.tensor(np.float32(eta))).to(x.device)


def sulq_dequant(codes: torch.Tensor, eta, lo, delta, bits: int) -> torch.Tensor:
    e = sulq_exponents(lo, delta, bits).to(codes.device)[codes.long()]
    return torch.exp2(e.double()).float() - float(eta)


def fake_sulq(x: torch.Tensor, eta, lo, delta, bits: int, log=torch.log) -> torch.Tensor:
    codes = sulq_codes_of_log(log(x.float() + float(eta)), lo, delta, bits)
    return sulq_dequant(codes, eta, lo, delta, bits)


def sulq_fit_params(x: torch.Tensor, eta: float, bits: int) -> dict[str, torch.Tensor]:
    """lo and hi are log2 of the smallest and largest x + eta; delta spreads 2^b codes between."""
    lo = math.log2(float(x.min().clamp(min=0)) + eta)
    hi = math.log2(float(x.max()) + eta)
    delta = max(hi - lo, 1e-6) / (2**bits - 1)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in (("eta", eta), ("lo", lo), ("delta", delta))}


def fit_sulq(x: torch.Tensor, bits: int, v: torch.Tensor | None, etas) -> dict[str, torch.Tensor]:
    """The eta of ``etas`` whose quantizer gives the smallest error of ``x @ v`` (attention's
    output; of x itself without ``v``)."""
    xs, vs = attention_sample(x, v)
    ref = xs if v is None else xs @ vs
    best, best_err = None, math.inf
    for eta in etas:
        params = sulq_fit_params(x, eta, bits)
        xq = fake_sulq(xs, *(params[k] for k in ("eta", "lo", "delta")), bits)
        err = float((((xq if v is None else xq @ vs) - ref) ** 2).mean())
        if err < best_err:
            best, best_err = params, err
    return best


class _SULQ(QuantizerKind):
    learnable = ()  # I&S-ViT keeps quantizer parameters frozen
    etas: tuple = ()

    def fit(self, x, bits, point):
        return fit_sulq(x, bits, point.partner, self.etas)

    def fake(self, x, params, bits):
        return fake_sulq(x, params["eta"], params["lo"], params["delta"], bits)

    def fake_ste(self, x, params, bits):
        eta, lo, delta = params["eta"], params["lo"], params["delta"]
        y = torch.log2(x + eta)
        k = torch.clamp(round_ste((y - lo) / delta), 0, 2**bits - 1)
        return torch.exp2(round_ste(lo + k * delta)) - eta



@register
class SULQ(_SULQ):
    """eta = 2^-j: deployed with integer shifts (``passes/sulq_softmax.py``)."""

    name = "sulq"
    etas = tuple(2.0**-j for j in SHIFTS)

    def exact_matmul(self, qa, qb):
        """Per part: exact sum of (2^7 >> shift) * v codes (zero point 1 on part 0), float32 of each
        sum times its unit, added in order, as the graph's integer GEMMs compute it."""
        p = torch_params(qa)
        kind_b, params_b = get_kind(qb.kind), torch_params(qb)
        s_b = kind_b.step(params_b)
        shifts = [torch.from_numpy(s) for s in C.sulq_part_shifts(p["lo"], p["delta"], p["eta"], qa.bits)]
        units = [torch.tensor(C.part_unit(p["eta"], s_b, i)) for i in range(len(shifts))]

        def sulq_matmul(a, b):
            codes = sulq_codes_of_log(sulq_log(a, p["eta"]), p["lo"], p["delta"], qa.bits).long()
            kv = kind_b.codes(b, params_b, qb.bits)
            out = None
            for i, (shift, unit) in enumerate(zip(shifts, units)):
                part = torch.bitwise_right_shift(torch.full_like(codes, 2**(PART_BITS - 1)), shift[codes]).float()
                term = exact_sum_matmul(part - (1 if i == 0 else 0), kv) * unit
                out = term if out is None else out + term
            return out

        return sulq_matmul


@register
class SULQFree(_SULQ):
    """The paper's free eta grid: simulation only (for measuring what eta = 2^-j costs)."""

    name = "sulq-free"
    etas = FREE_ETAS

    def exact_matmul(self, qa, qb):
        p, q_b = torch_params(qa), torch_params(qb)
        kind_b = get_kind(qb.kind)
        return lambda a, b: self.fake(a, p, qa.bits) @ kind_b.fake(b, q_b, qb.bits)

