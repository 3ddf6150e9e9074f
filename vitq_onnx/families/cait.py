"""timm's CaiT family (``cait_xxs24_224`` .. ``cait_m48_448``): talking-heads self-attention blocks,
then class-attention blocks that update the class token alone; LayerScale on every branch.

Talking heads (``TalkingHeadAttn``, in ``blocks``): ``proj_l``, a Linear across the heads, maps the
logits q @ k^T before the Softmax and ``proj_w`` maps the probabilities after it, before attn @ v.
Both are ordinary quantized Linear layers: their inputs (the logits; the probabilities) take
uniform per-tensor quantizers and their 4x4 .. 16x16 weights per-channel ones, with integer
kernels in the graph like any Linear. q @ k^T is quantized as ViT's (q, k). attn @ v's first input
is ``proj_w``'s output, no longer the Softmax's: mixed probabilities of either sign, which the
post-Softmax kinds (log2, log2-table, SULQ: codes taken from the Softmax's LogSoftmax) cannot
represent, so it is quantized as any activation (role ``attn``: uniform with a zero point, whatever
the method's Softmax kind); v as ViT's. The graph's attn @ v is found from the Softmax through
proj_w's Transpose/MatMul/Add/Transpose (``passes/name_nodes.py``).

Class attention (``ClassAttn``, in ``blocks_token_only``): q from the class token only, k and v
from the class token and the patches; quantized as ViT's attention (q, k, the probabilities, v).

LayerScale's ``gamma_1``/``gamma_2`` multiply the branches in float, as timm does.

Blocks: ``blocks`` (a Sequential) take ``x``; ``blocks_token_only`` (a ModuleList) take
``(x, x_cls)``: the patch tokens and the class token (the model's ``cls_token`` for the first).

norm -> Linear folds: in ``blocks``, ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only
``mlp.fc1``; in ``blocks_token_only``, ``norm1`` (over the class token and the patches) feeds
``attn.k``, ``attn.v`` and, through the class token's slice, ``attn.q``: one fold for the three
(ranges fitted on k's input, every token), and ``norm2`` only ``mlp.fc1``. The final ``norm``
feeds the head through the class token's slice; it is not folded (as ViT's is not).
"""

from __future__ import annotations

from .registry import Family, register_family


def _talking_heads_forward(self, x):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]

    def logits(attn):
        return self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def probabilities(attn):
        return self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    x = self.vq_attend(q, k, v, logits, mix=probabilities).transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


_talking_heads_forward.av_role = "attn"  # attn @ v reads proj_w's output, not the Softmax's


def _class_attention_forward(self, x):
    B, N, C = x.shape
    q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
    k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
    v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)

    x_cls = self.vq_attend(q * self.scale, k, v)

    x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
    x_cls = self.proj(x_cls)
    x_cls = self.proj_drop(x_cls)
    return x_cls


@register_family
class CaiT(Family):
    name = "cait"
    description = "timm CaiT (talking-heads and class attention)"
    float_ops = ("LayerScale Mul",)
    short_names = {
        "cait_xxs": "cait_xxs24_224",
        "cait_s": "cait_s24_224",
    }

    def attention_forward(self, module):
        from timm.models.cait import ClassAttn, TalkingHeadAttn

        if isinstance(module, TalkingHeadAttn):
            return _talking_heads_forward
        return _class_attention_forward if isinstance(module, ClassAttn) else None

    def norm_linear_pairs(self, module):
        from timm.models.cait import LayerScaleBlock, LayerScaleBlockClassAttn

        if isinstance(module, LayerScaleBlock):
            return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")]
        if isinstance(module, LayerScaleBlockClassAttn):
            return [("norm1", ("attn.k", "attn.v", "attn.q")), ("norm2", "mlp.fc1")]
        return []
