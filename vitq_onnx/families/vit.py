"""timm's VisionTransformer family: ViT, DeiT, DeiT III, DINOv2, FlexiViT and CLIP image towers.

Attention: ``timm.layers.attention.Attention`` (one qkv Linear, optional q/k norms, no gate).
Blocks: ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only ``mlp.fc1``.
"""

from __future__ import annotations

from ..errors import VitqError
from .registry import Family, register_family


def _forward(self, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:
        raise VitqError("masked or causal attention is not supported")
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = self.vq_attend(q * self.scale, k, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    x = self.proj(x)
    return self.proj_drop(x)


@register_family
class ViT(Family):
    name = "vit"
    description = "timm VisionTransformer: ViT, DeiT, DeiT III, DINOv2, FlexiViT, CLIP towers"
    short_names = {
        "vit_s": "vit_small_patch16_224",
        "vit_b": "vit_base_patch16_224",
        "deit_t": "deit_tiny_patch16_224",
        "deit_s": "deit_small_patch16_224",
        "deit_b": "deit_base_patch16_224",
    }

    def attention_forward(self, module):
        from timm.layers.attention import Attention

        if not isinstance(module, Attention):
            return None
        if module.gate is not None:
            raise VitqError("gated attention is not supported")
        return _forward

    def norm_linear_pairs(self, module):
        from timm.models.vision_transformer import Block

        return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")] if isinstance(module, Block) else []
