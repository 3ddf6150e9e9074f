"""timm's EVA family: EVA, EVA-02 and the other ``timm.models.eva`` models built on ``EvaAttention``.

Attention: ``EvaAttention``, one qkv Linear (q and v biases beside it, moved into its bias by
``prepare`` as BEiT's) or separate q/k/v Linears. Quantized like ViT's: q (scaled), k, the softmax
output and v; the rotary position embedding is applied to q and k in float before their quant
points (elementwise products with a constant sin/cos table, as timm computes them); the optional
q/k norms, the inner norm before ``proj`` and a gate's product stay float. Masked or causal
attention is refused. ``AttentionRope`` (``attn_type='rope'``) is not claimed: a model built with
it is refused before calibration.

MLP: SwiGLU (``GluMlp`` with packed ``fc1``, or ``SwiGLU`` with ``fc1_g``/``fc1_x``): the product
``silu(gate) * x`` is elementwise, float like GELU. LayerScale's gamma products stay float.

norm -> Linear pairs: a pre-norm block's ``norm1`` feeds only ``attn.qkv`` (or ``q_proj``,
``k_proj`` and ``v_proj``; and a gated attention's ``gate``: all folded together) and
``norm2`` only ``mlp.fc1`` (or ``fc1_g`` and ``fc1_x``); the attention's inner norm
(``scale_attn_inner``) only ``proj`` (not with a gate: the gate's product sits between them); an
MLP's inner norm (``scale_mlp``) only ``fc2``: declared for timm's ``Mlp``, ``GluMlp`` and
``SwiGLU`` wherever they hold a LayerNorm (BEiT's included). A post-norm block
(``EvaBlockPostNorm``) normalizes the branch outputs before the residual Add: no pair.

Blocks are called with the model's rotary table as a keyword (``rope``), and sit in an
``nn.ModuleList``, not a ``Sequential``.
"""

from __future__ import annotations

from ..errors import VitqError
from .beit import mlp_input_linears, move_qkv_bias, qkv_projection
from .registry import Family, register_family


def _forward(self, x, rope=None, attn_mask=None, is_causal=False):
    import torch
    from timm.layers import apply_rot_embed_cat

    if attn_mask is not None or is_causal:
        raise VitqError("masked or causal attention is not supported")
    B, N, C = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        qkv = qkv_projection(self, x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, num_heads, N, head_dim
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # B, num_heads, N, C
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt = self.num_prefix_tokens
        half = getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    x = self.vq_attend(q * self.scale, k, v)
    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    return self.proj_drop(x)


@register_family
class Eva(Family):
    name = "eva"
    description = "timm EVA, EVA-02 (EvaAttention: rotary embedding, SwiGLU)"
    float_ops = ("EVA rotary position embedding (q, k)", "SwiGLU product", "LayerScale Mul")
    short_names = {
        "eva02_t": "eva02_tiny_patch14_224",
        "eva02_s": "eva02_small_patch14_224",
    }

    def attention_forward(self, module):
        from timm.models.eva import EvaAttention

        return _forward if isinstance(module, EvaAttention) else None

    def prepare(self, module):
        from timm.models.eva import EvaAttention

        if isinstance(module, EvaAttention):
            move_qkv_bias(module)

    def norm_linear_pairs(self, module):
        from timm.layers import GluMlp, Mlp, SwiGLU
        from timm.models.eva import EvaAttention, EvaBlock

        if isinstance(module, (Mlp, GluMlp, SwiGLU)):
            return [("norm", "fc2")]  # kept only where ``norm`` is a LayerNorm (an Identity otherwise)
        if isinstance(module, EvaAttention):
            return [("norm", "proj")] if module.gate is None else []
        if not isinstance(module, EvaBlock) or not isinstance(module.attn, EvaAttention):
            return []
        attn = module.attn
        reads_x = (["qkv"] if attn.qkv is not None else ["q_proj", "k_proj", "v_proj"]) \
            + (["gate"] if attn.gate is not None else [])
        return [("norm1", f"attn.{p}") for p in reads_x] \
            + [("norm2", f"mlp.{fc}") for fc in mlp_input_linears(module.mlp)]
