"""timm's Swin Transformer V1 family: windowed attention with a relative position bias and
shifted-window masks, and patch merging between stages.

Attention: ``WindowAttention`` (the bias and mask are added to q @ k^T in float before the
Softmax). Blocks: ``norm1`` feeds only ``attn.qkv`` (through window partition and padding: layout
ops the fold passes through), ``norm2`` only ``mlp.fc1``; ``PatchMerging``'s ``norm`` only
``reduction``.
"""

from __future__ import annotations

from .registry import Family, register_family


def _forward(self, x, mask=None):
    B_, N, _ = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    num_win = 1 if mask is None else mask.shape[0]

    def adjust(attn):
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return attn

    x = self.vq_attend(q * self.scale, k, v, adjust, num_win)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    x = self.proj(x)
    return self.proj_drop(x)


@register_family
class Swin(Family):
    name = "swin"
    description = "timm Swin Transformer V1"
    short_names = {
        "swin_t": "swin_tiny_patch4_window7_224",
        "swin_s": "swin_small_patch4_window7_224",
        "swin_b": "swin_base_patch4_window7_224",
    }

    def attention_forward(self, module):
        from timm.models.swin_transformer import WindowAttention

        return _forward if isinstance(module, WindowAttention) else None

    def norm_linear_pairs(self, module):
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

        if isinstance(module, SwinTransformerBlock):
            return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")]
        return [("norm", "reduction")] if isinstance(module, PatchMerging) else []
