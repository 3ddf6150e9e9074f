"""MPTQ-ViT's SmoothQuant with bias (SQ-b) and post-GELU output-error scale search (OPT-m).

SQ-b: at a LayerNorm -> Linear pair, Y = XW^T + b = ((X - mu)/eps)(W diag(eps))^T + (b + W mu), with mu
each channel's mean and eps = max|X - mu|^alpha / max|W|^(1 - alpha) per input channel. It is a
``Reparam`` (r1 = eps, shift = -mu): folded into the LayerNorm affine and the Linear exactly as
RepQ-ViT's is (same passes, same simulation), no new ops. alpha is searched per pair on
calibration rows by the error of the quantized Linear output. (Followed by RepQ-ViT's channel-wise
reparameterization it would change nothing but a global factor: that one equalizes every
channel's range whatever eps did first, so ``mptq`` uses SQ-b instead of it.)

OPT-m: the fc2 input (post-GELU, a long positive tail) gets the per-tensor range that minimizes
fc2's output error on calibration rows, (Q(x) - x) W^T, instead of the input's own error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..recipe import Reparam, tensor_key
from .quantizers.uniform import fake_uniform, fit_uniform_rows
from .quantizers.weights import fake_weight, fit_weight
from .reparam import fold_into_torch
from .stages import Stage, post_norm_pairs
from .state import CalibState

SQB_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SEARCH_ROWS = 1024


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """eps = max|X|^alpha / max|W|^(1 - alpha) per channel (SmoothQuant), kept finite and positive."""
    eps = x_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return eps.clamp(min=1e-5)


def output_error(rows: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, mu: torch.Tensor, w_bits: int,
                 a_bits: int) -> float:
    """Squared error of the quantized Linear output for the smoothed rows and weight (bias cancels)."""
    x = (rows - mu) / eps
    w = weight * eps[None, :]
    scale, zp = fit_uniform_rows(x, a_bits)
    xq = fake_uniform(x, scale, zp, a_bits)
    wq = fake_weight(w, fit_weight(w, w_bits, x.pow(2).mean(0)), w_bits)
    return float(((xq @ wq.t() - rows @ weight.t()) ** 2).mean())


@dataclass
class SmoothBias(Stage):
    """SQ-b at every LayerNorm -> Linear pair, alpha searched per pair (module docstring)."""

    alphas: tuple[float, ...] = SQB_ALPHAS
    name = "smooth_bias"
    image_passes = 1.5

    def describe(self, state):
        return f"SmoothQuant with bias, alpha in {list(self.alphas)} per norm ({len(state.inst.post_norm)} norms)"

    @torch.no_grad()
    def run(self, state: CalibState) -> None:
        chosen = {}
        for norm_node, norm, lin_nodes, linears, (lo, hi, rows) in post_norm_pairs(state, self, SEARCH_ROWS):
            weight = torch.cat([lin.weight.detach().float().cpu() for lin in linears])
            mu = rows.mean(0)
            x_absmax, w_absmax = torch.maximum((lo - mu).abs(), (hi - mu).abs()), weight.abs().amax(0)
            w_bits = state.bits.weight(tensor_key(lin_nodes[0], 1))
            a_bits = state.bits.act(tensor_key(lin_nodes[0], 0), "linear_input")
            alpha = min(self.alphas, key=lambda al: output_error(
                rows, weight, smooth_factors(x_absmax, w_absmax, al), mu, w_bits, a_bits))
            eps = smooth_factors(x_absmax, w_absmax, alpha)
            rep = Reparam(norm_node, lin_nodes, eps.numpy().astype(np.float32), (-mu).numpy().astype(np.float32))
            fold_into_torch(norm, linears, rep)
            state.recipe.reparams.append(rep)
            chosen[norm_node] = alpha
        state.recipe.info["sqb_alpha"] = chosen
