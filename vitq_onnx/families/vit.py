"""timm's VisionTransformer family: ViT, DeiT, DeiT III, DINOv2, FlexiViT and CLIP image towers.

Attention: ``timm.layers.attention.Attention`` (one qkv Linear, optional q/k norms, no gate).
Blocks: ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only ``mlp.fc1``. A checkpoint saved at
another input size gets its absolute position embedding resampled.
"""

from __future__ import annotations

from ..errors import VitqError
from .registry import Family, register_family


def _forward(self, x, attn_mask=None, is_causal=False, rows=None):
    """``rows``: only these query rows (``_block_rows``), which see every key and value."""
    if attn_mask is not None or is_causal:
        raise VitqError("masked or causal attention is not supported")
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if rows is not None:
        q, N = q[:, :, rows], len(rows)
    x = self.vq_attend(q * self.scale, k, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    x = self.proj(x)
    return self.proj_drop(x)


def _block_rows(block):
    """timm's ``Block.forward`` at some token rows only: the attention's queries and everything
    after them on those rows, its keys and values on every token (the same values there)."""
    def forward(x, rows):
        kept = x[:, rows] + block.drop_path1(block.ls1(block.attn(block.norm1(x), rows=rows)))
        return kept + block.drop_path2(block.ls2(block.mlp(block.norm2(kept))))

    return forward


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

    def adapt_checkpoint(self, state, model):
        """The absolute position embedding resampled to the model's patch grid (bicubic, the class
        and register tokens' entries kept), as timm's ``checkpoint_filter_fn`` does."""
        from timm.layers import resample_abs_pos_embed
        from timm.models.vision_transformer import VisionTransformer

        old = state.get("pos_embed")
        if not isinstance(model, VisionTransformer) or old is None or model.pos_embed is None \
                or old.shape == model.pos_embed.shape or old.shape[-1] != model.pos_embed.shape[-1]:
            return []  # nothing to resample, or another width: that checkpoint is another model's
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(old, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
        return [f"pos_embed resampled from {tuple(old.shape)} to {tuple(state['pos_embed'].shape)} "
                f"(bicubic, for a {model.patch_embed.img_size[0]}-px input)"]

    def block_rows(self, block):
        from timm.models.vision_transformer import Block

        return _block_rows(block) if type(block) is Block and getattr(block.attn, "vq_attend", None) else None

    def norm_linear_pairs(self, module):
        from timm.models.vision_transformer import Block

        return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")] if isinstance(module, Block) else []
