"""LayerNorm, Softmax and GELU computed so that PyTorch and onnxruntime agree bit for bit.

Float kernels sum in different orders and approximate exp/erf differently, so their last bits
differ; at 4 bits one such bit can move an activation to the next code, and the change spreads.
Here the statistics and transcendental functions run in float64 with one fixed sequence of IEEE
operations (the ``deterministic_float`` pass emits the same sequence), and results are rounded
to float32 once, where both runtimes land on the same value. GELU uses the Abramowitz & Stegun
7.1.26 erf (|error| < 1.5e-7), built from exp and arithmetic only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

INV_SQRT2 = 1.0 / math.sqrt(2.0)
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    xd = x.double()
    d = xd - xd.mean(-1, keepdim=True)
    var = (d * d).mean(-1, keepdim=True)
    y = (d / torch.sqrt(var + float(np.float32(eps)))).float() * weight
    return y if bias is None else y + bias


def softmax(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    e = torch.exp(xd - xd.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).float()


def gelu(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    u = xd * INV_SQRT2
    a = u.abs()
    t = 1.0 / (a * ERF_P + 1.0)
    poly = t * ERF_A[4]
    for coef in reversed(ERF_A[:4]):
        poly = (poly + coef) * t
    erf = torch.sign(u) * (1.0 - poly * torch.exp(-(a * a)))
    return ((xd * 0.5) * (erf + 1.0)).float()
