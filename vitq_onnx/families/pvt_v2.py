"""timm's Pyramid Vision Transformer v2 family (``pvt_v2_b0`` .. ``b5``, ``b2_li``): spatial-reduction
attention in four stages of shrinking token grids.

Attention: ``pvt_v2.Attention``. q is a Linear on the tokens; k and v come from one ``kv`` Linear
on the tokens themselves (``sr_ratio`` 1), on a strided-Conv2d-reduced grid after a LayerNorm
(``sr_ratio`` > 1), or, in the linear variant (``_li``), on an adaptive-average-pooled grid after a
1x1 Conv2d, a LayerNorm and a GELU. q @ k^T and softmax @ v are quantized as ViT's (q, k, the
probabilities, v); the reduction conv and kv are ordinary quantized Conv2d/Linear layers. The
MLP's depthwise 3x3 Conv2d between fc1 and fc2 is a quantized Conv2d (its input is fc1's output,
after the extra ReLU of the linear variant); GELU then feeds fc2, as in timm.

Blocks (``stages.<i>.blocks``, a ModuleList) take ``(x, feat_size)``: the token grid's (H, W).

norm -> Linear folds: ``norm2`` feeds only ``mlp.fc1``, and the reduction's ``attn.norm`` only
``attn.kv`` (not in the linear variant: a GELU sits between them). ``norm1`` folds only where
``sr_ratio`` is 1: it then feeds ``attn.q`` and ``attn.kv``, which fold together (one r1 for both
Linears); with ``sr_ratio`` > 1 (or the linear variant) it also feeds the reduction Conv2d, which
the fold does not handle (it scales a Linear's input columns), so it stays per-tensor. The
stages' ``downsample.norm`` (after the overlapping patch-embedding conv) feeds the residual
stream, not a Linear.
"""

from __future__ import annotations

from .registry import Family, register_family


def _forward(self, x, feat_size):
    B, N, C = x.shape
    H, W = feat_size
    q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)

    if self.pool is not None:
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.sr(self.pool(x)).reshape(B, C, -1).permute(0, 2, 1)
        x = self.norm(x)
        x = self.act(x)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    else:
        if self.sr is not None:
            x = x.permute(0, 2, 1).reshape(B, C, H, W)
            x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
            x = self.norm(x)
            kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)

    x = self.vq_attend(q * self.scale, k, v)

    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


@register_family
class PvtV2(Family):
    name = "pvt_v2"
    description = "timm Pyramid Vision Transformer v2 (spatial-reduction attention)"
    short_names = {
        "pvt_b0": "pvt_v2_b0",
        "pvt_b1": "pvt_v2_b1",
    }

    def attention_forward(self, module):
        from timm.models.pvt_v2 import Attention

        return _forward if isinstance(module, Attention) else None

    def norm_linear_pairs(self, module):
        from timm.models.pvt_v2 import Attention, Block

        if isinstance(module, Block):
            pairs = [("norm2", "mlp.fc1")]
            if module.attn.sr is None and module.attn.pool is None:
                pairs.append(("norm1", ("attn.q", "attn.kv")))
            return pairs
        if isinstance(module, Attention) and module.pool is None and module.sr is not None:
            return [("norm", "kv")]
        return []
