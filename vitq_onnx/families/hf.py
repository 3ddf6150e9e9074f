"""Hugging Face ``transformers`` vision towers: ViT, DINOv2, CLIP and SigLIP (``--model hf:DIR``).

Attention: the towers' attention modules (separate q/k/v Linears) call the attention function
their config names; ``prepare`` names ours (``vitq_onnx``), which computes softmax((q·scale)
@ kᵀ [+ mask]) @ v through the module's quant points when it has them, and the same ops in float
otherwise, so the exported graph and the simulation see one form. SigLIP's attention-pooling
head uses ``torch.nn.MultiheadAttention`` (its projections are no Linear modules and its product
runs fused): ``prepare`` replaces it by ``PoolAttention``, the same maths with q/k/v/out Linears.
Blocks: the norm before attention feeds only q, k and v, the norm before the MLP only fc1; the
pooling head's norm only its MLP's fc1.
"""

from __future__ import annotations

import functools

from .registry import Family, register_family

ATTENTION = "vitq_onnx"  # the name our attention function is registered under in transformers
_CLASSES = ("ViTAttention", "Dinov2Attention", "CLIPAttention", "SiglipAttention", "PoolAttention")
# block class -> (norm, Linears it alone feeds)
_PAIRS = {
    "ViTLayer": (("layernorm_before", "attention", "q_proj k_proj v_proj"), ("layernorm_after", "mlp", "fc1")),
    "Dinov2Layer": (("norm1", "attention", "q_proj k_proj v_proj"), ("norm2", "mlp", "fc1")),
    "CLIPEncoderLayer": (("layer_norm1", "self_attn", "q_proj k_proj v_proj"), ("layer_norm2", "mlp", "fc1")),
    "SiglipEncoderLayer": (("layer_norm1", "self_attn", "q_proj k_proj v_proj"), ("layer_norm2", "mlp", "fc1")),
    "SiglipMultiheadAttentionPoolingHead": (("layernorm", "mlp", "fc1"),),
}


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **_kwargs):
    """transformers' attention-function signature; (B, N, heads, head_dim) out, no weights."""
    q = query * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    adjust = None if attention_mask is None else (lambda attn: attn + attention_mask)
    attend = getattr(module, "vq_attend", None)
    if attend is not None:
        out = attend(q, key, value, adjust)
    else:
        attn = q @ key.transpose(-2, -1)
        out = (attn if adjust is None else adjust(attn)).softmax(dim=-1) @ value
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _pool_attention_class():
    import torch
    from torch import nn

    class PoolAttention(nn.Module):
        """``nn.MultiheadAttention`` (batch first, no mask) with its projections as Linears."""

        def __init__(self, mha: nn.MultiheadAttention):
            super().__init__()
            dim, self.num_heads = mha.embed_dim, mha.num_heads
            self.head_dim = dim // mha.num_heads
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
            with torch.no_grad():
                for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                    lin.weight.copy_(mha.in_proj_weight[i * dim:(i + 1) * dim])
                    lin.bias.copy_(mha.in_proj_bias[i * dim:(i + 1) * dim])
            self.out_proj = nn.Linear(dim, dim)
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

        def forward(self, query, key, value, **_kwargs):
            def heads(x):
                return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

            out, _ = attention(self, heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value)))
            return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1)), None

    return PoolAttention


@register_family
class HuggingFace(Family):
    name = "hf"
    description = "Hugging Face transformers ViT, DINOv2, CLIP and SigLIP vision towers (--model hf:DIR)"

    def prepare(self, module):
        from torch import nn

        if type(module).__name__ == "HFVision":
            from transformers import AttentionInterface

            AttentionInterface.register(ATTENTION, attention)
            module.tower.set_attn_implementation(ATTENTION)
        if type(module).__name__ == "SiglipMultiheadAttentionPoolingHead" \
                and isinstance(module.attention, nn.MultiheadAttention):
            module.attention = _pool_attention_class()(module.attention)

    def attention_forward(self, module):
        cls = type(module)
        if cls.__name__ not in _CLASSES or not cls.__module__.startswith(("transformers.", __name__)):
            return None
        return cls.forward  # the tower's own forward: its attention function is ours (prepare)

    def norm_linear_pairs(self, module):
        pairs = _PAIRS.get(type(module).__name__, ()) if type(module).__module__.startswith("transformers.") else ()
        return [(norm, f"{parent}.{lin}") for norm, parent, lins in pairs for lin in lins.split()]
