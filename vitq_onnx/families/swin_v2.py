"""timm's Swin Transformer V2 family: cosine window attention with a learned logit scale, a
continuous position bias, shifted-window masks, post-norm blocks and patch merging.

Attention: ``swin_transformer_v2.WindowAttention``. q and k are L2-normalized (``F.normalize``,
which the simulation computes with onnxruntime's ReduceL2, as the graph does) and then quantized
like ViT's q and k, as are the Softmax output and v. The logit scale, the position bias and the
shifted-window mask are applied in float to q @ k^T before the Softmax, in timm's order
(``adjust``: times the scale, plus the bias, plus the mask), so the logit scale multiplies the
dequantized product, never a quantized input.

The logit scale (``logit_scale`` clamped and exponentiated) and the position bias
(``16 * sigmoid(cpb_mlp(relative_coords_table))``, gathered per window position) read no input:
``prepare`` computes both once, in PyTorch, into non-persistent buffers the forward reads (the
same values timm computes on each forward; the graph holds them as two constants, so neither
onnxruntime's Exp and Sigmoid nor quantized Linears ever compute them). ``cpb_mlp``'s Linears
become a float layer that is not a ``nn.Linear`` (same parameters and names): no quant point
is attached to them, and timm's own forward still runs. ``prepare`` also moves the q/v bias
timm passes to ``F.linear`` beside ``qkv`` into ``qkv.bias`` (the same product), so the qkv
quant point sees the layer.

norm -> Linear pairs: none. The blocks are post-norm (``x + norm1(attn(x))``,
``x + norm2(mlp(x))``): each norm reads an attention or MLP output and feeds only the residual
sum, never a Linear, and ``PatchMerging``'s norm comes after its ``reduction``. The final norm
reaches the head through the global pooling. So RepQ-ViT's channel-wise fold has nothing to fold
here: every Linear reads a residual sum or a GELU output, quantized per tensor.
"""

from __future__ import annotations

import math

from ..errors import VitqError
from .registry import Family, register_family

_FLOAT_LINEAR = None


def _float_linear_class():
    """A Linear's function without being an ``nn.Linear``: quant points skip it (kept float)."""
    global _FLOAT_LINEAR
    if _FLOAT_LINEAR is None:
        import torch.nn.functional as F
        from torch import nn

        class FloatLinear(nn.Module):
            def __init__(self, linear: nn.Linear):
                super().__init__()
                self.in_features, self.out_features = linear.in_features, linear.out_features
                self.weight, self.bias = linear.weight, linear.bias

            def forward(self, x):
                return F.linear(x, self.weight, self.bias)

        _FLOAT_LINEAR = FloatLinear
    return _FLOAT_LINEAR


def _forward(self, x, mask=None):
    import torch.nn.functional as F

    if not hasattr(self, "vq_position_bias"):
        raise VitqError("Swin V2 attention needs vitq_onnx.models.prepare_model(model) before calibration")
    B_, N, C = x.shape
    qkv = self.qkv(x)
    qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    num_win = 1 if mask is None else mask.shape[0]

    def adjust(attn):
        attn = attn * self.vq_logit_scale
        attn = attn + self.vq_position_bias.unsqueeze(0)
        if mask is not None:
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return attn

    x = self.vq_attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, adjust, num_win)
    x = x.transpose(1, 2).reshape(B_, N, C)
    x = self.proj(x)
    return self.proj_drop(x)


@register_family
class SwinV2(Family):
    name = "swin_v2"
    description = "timm Swin Transformer V2"
    float_ops = ("Swin V2 q/k L2 normalization", "Swin V2 logit scale, position bias (constants) and mask",
                 "Swin V2 post-norm LayerNorm")
    short_names = {
        "swinv2_t": "swinv2_tiny_window8_256",
        "swinv2_s": "swinv2_small_window8_256",
    }

    def attention_forward(self, module):
        from timm.models.swin_transformer_v2 import WindowAttention

        return _forward if isinstance(module, WindowAttention) else None

    def prepare(self, module):
        import torch
        from timm.models.swin_transformer_v2 import WindowAttention

        if not isinstance(module, WindowAttention):
            return
        with torch.no_grad():
            if module.q_bias is not None:  # timm: F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))
                bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
                if module.qkv.bias is not None:  # (not timm's: qkv has no bias of its own)
                    bias = bias + module.qkv.bias
                module.qkv.bias = torch.nn.Parameter(bias.detach().clone())
                module.q_bias = module.v_bias = module.k_bias = None
            float_linear = _float_linear_class()
            for i, layer in enumerate(module.cpb_mlp):
                if isinstance(layer, torch.nn.Linear):
                    module.cpb_mlp[i] = float_linear(layer)
            # timm's forward, the parts that read no input
            logit_scale = torch.clamp(module.logit_scale, max=math.log(1. / 0.01)).exp()
            # (heads, N, 1), the same values: onnxruntime folds a Mul by a one-element constant (one
            # head) into the MatMul before it (qdq: alpha = s_q * s_k * scale, one product where the
            # simulation takes two, with other last bits)
            area = module.window_size[0] * module.window_size[1]
            logit_scale = logit_scale.expand(module.num_heads, area, 1).contiguous()
            table = module.cpb_mlp(module.relative_coords_table).view(-1, module.num_heads)
            bias = table[module.relative_position_index.view(-1)].view(area, area, -1)
            bias = 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())
        module.register_buffer("vq_logit_scale", logit_scale, persistent=False)
        module.register_buffer("vq_position_bias", bias, persistent=False)
