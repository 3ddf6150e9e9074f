"""timm's TinyViT family: a conv stem and MBConv stage, then windowed attention stages with a
learned attention bias, a depthwise local conv between attention and MLP, conv patch merging.

Attention: ``tiny_vit.Attention`` (its own LayerNorm before ``qkv``; q, k, the probabilities and
v quantized like ViT's; the attention bias, gathered from ``attention_biases`` by
``attention_bias_idxs``, is added to q @ k^T in float before the Softmax). Convolutions (stem,
MBConv, patch merging, ``local_conv``) are timm's ``ConvNorm``: a Conv2d + BatchNorm2d
Sequential, which ``models.fold_batch_norms`` folds before calibration; their inputs are
quantized like any Conv2d's.

norm -> Linear pairs: ``attn.norm`` feeds only ``attn.qkv`` and ``mlp.norm`` (``NormMlp``) only
``mlp.fc1``: both fold. The head's ``LayerNorm2d`` (after global pooling, before ``fc``) is
left out, as for the other families' heads (the simulation runs it on onnxruntime's LayerNorm,
channels last, as the graph does).

Blocks: ``stages.N.blocks`` are Sequentials of ``MBConv`` (stage 0) and ``TinyVitBlock``, each
reading one (B, H, W, C) or (B, C, H, W) tensor; the attention bias and window partition are the
block's own.
"""

from __future__ import annotations

from .registry import Family, register_family


def _forward(self, x):
    B, N, _ = x.shape
    attn_bias = self.attention_biases[:, self.attention_bias_idxs]  # timm's tracing/training path
    x = self.norm(x)
    qkv = self.qkv(x)
    q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
    q = q.permute(0, 2, 1, 3)
    k = k.permute(0, 2, 1, 3)
    v = v.permute(0, 2, 1, 3)
    x = self.vq_attend(q * self.scale, k, v, lambda attn: attn + attn_bias)
    x = x.transpose(1, 2).reshape(B, N, self.out_dim)
    return self.proj(x)


@register_family
class TinyViT(Family):
    name = "tiny_vit"
    description = "timm TinyViT"
    float_ops = ("TinyViT attention bias",)
    short_names = {
        "tinyvit_5m": "tiny_vit_5m_224",
        "tinyvit_21m": "tiny_vit_21m_224",
    }

    def attention_forward(self, module):
        from timm.models.tiny_vit import Attention

        return _forward if isinstance(module, Attention) else None

    def norm_linear_pairs(self, module):
        from timm.models.tiny_vit import Attention, NormMlp

        if isinstance(module, Attention):
            return [("norm", "qkv")]
        return [("norm", "fc1")] if isinstance(module, NormMlp) else []
