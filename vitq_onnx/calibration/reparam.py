"""RepQ-ViT scale reparameterization, in torch (the ONNX side is passes/fold_reparam.py).

A per-channel quantizer (s_c, z_c) on a LayerNorm output becomes the per-tensor one
(mean(s), round(mean(z))) after dividing the LayerNorm's affine by r1 = s/mean(s) and adding
shift = s*(z - round(mean(z))); the next Linear absorbs r1 in its weight columns and the shift in
its bias. Codes are exactly the per-channel codes, the FP function is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..recipe import Reparam
from .quantizers.uniform import fit_uniform_per_channel


def channelwise_reparam(stats, bits: int, norm: str, linears: list[str]):
    """Fit per-channel ranges on ``channel_stats`` of the norm's output; return the Reparam and the
    per-tensor (scale, zero_point)."""
    scale, zp = fit_uniform_per_channel(stats, bits)
    scale_t = scale.mean()
    zp_t = torch.round(zp.mean())
    r1 = scale / scale_t
    shift = scale * (zp - zp_t)
    rep = Reparam(norm, linears, r1.numpy().astype(np.float32), shift.numpy().astype(np.float32))
    return rep, scale_t, zp_t


def bias_delta(weight_in_out, shift):
    """-(shift @ W) summed in float64, rounded once: torch and the ONNX pass get the same bits."""
    return -(shift.double() @ weight_in_out.double()).float()


@torch.no_grad()
def fold_into_torch(norm: nn.LayerNorm, linears: list[nn.Linear], rep: Reparam) -> None:
    r1 = torch.from_numpy(rep.r1).to(norm.weight.device)
    shift = torch.from_numpy(rep.shift).to(norm.weight.device)
    for lin in linears:
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=r1.device)
        new_bias = bias + bias_delta(lin.weight.t(), shift)
        lin.weight.mul_(r1[None, :])
        lin.bias = nn.Parameter(new_bias)
    norm.bias = nn.Parameter((norm.bias + shift) / r1)
    norm.weight.div_(r1)
