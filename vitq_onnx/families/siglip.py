"""timm's attention-pooling head (``AttentionPoolLatent``), the ``map`` pool of SigLIP image towers
(``vit_base_patch16_siglip_224`` and the other ``*_siglip_*``) and of other ViTs built with
``global_pool='map'``; their trunk is the ``vit`` family's.

Attention: q is a Linear on a learned latent (a parameter broadcast over the batch: its input
quantizer fits the latent's values, constant but quantized like any Linear input), k and v one
``kv`` Linear on the trunk's tokens; q @ k^T and softmax @ v are quantized as ViT's (q, k, the
probabilities, v). Then ``proj``, and a residual MLP behind ``norm``. A learned position
embedding (``pos_embed='abs'``) is added to the tokens in float before ``kv``, as timm does; an
attention mask is refused.

norm -> Linear folds: the pool's ``norm`` feeds only ``mlp.fc1``; the trunk's final ``norm``
(``VisionTransformer.norm``) feeds only the pool's ``kv`` (through the prefix tokens' slice) when
the pool adds no position embedding, and folds into it.
"""

from __future__ import annotations

from ..errors import VitqError
from .registry import Family, register_family


def _forward(self, x, attn_mask=None):
    if attn_mask is not None:
        raise VitqError("masked attention pooling is not supported")
    B, N, C = x.shape

    if self.pos_embed is not None:
        x = x + self.pos_embed.unsqueeze(0).to(x.dtype)

    q_latent = self.latent.expand(B, -1, -1)
    q = self.q(q_latent).reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)

    kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)

    q, k = self.q_norm(q), self.k_norm(k)

    x = self.vq_attend(q * self.scale, k, v)
    x = x.transpose(1, 2).reshape(B, self.latent_len, C)
    x = self.proj(x)
    x = self.proj_drop(x)

    if self.mlp is not None:
        x = x + self.mlp(self.norm(x))

    if self.pool == 'token':
        x = x[:, 0]
    elif self.pool == 'avg':
        x = x.mean(1)
    return x


@register_family
class SigLIP(Family):
    name = "siglip"
    description = "timm attention-pooling head (AttentionPoolLatent: SigLIP towers, global_pool='map')"
    float_ops = ("attention-pool latent query (a constant)",)
    short_names = {
        "siglip_b": "vit_base_patch16_siglip_224",
    }

    def attention_forward(self, module):
        from timm.layers.attention_pool import AttentionPoolLatent

        return _forward if isinstance(module, AttentionPoolLatent) else None

    def norm_linear_pairs(self, module):
        from timm.layers.attention_pool import AttentionPoolLatent
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(module, AttentionPoolLatent):
            return [("norm", "mlp.fc1")] if module.mlp is not None else []
        if isinstance(module, VisionTransformer) and isinstance(module.attn_pool, AttentionPoolLatent) \
                and module.attn_pool.pos_embed is None:
            return [("norm", "attn_pool.kv")]
        return []
