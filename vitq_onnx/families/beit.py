"""timm's BEiT family: BEiT and BEiT v2 (``timm.models.beit``).

Attention: ``beit.Attention``, one qkv Linear whose q and v biases are separate parameters that
timm passes to ``F.linear`` beside it. ``prepare`` moves them into the Linear's bias (the same
``F.linear`` call, the same float outputs), so the Linear's input quant point and weight see the
layer as the graph holds it. Quantized like ViT's: q (scaled), k, the softmax output and v.
Float: the relative position bias (each block's table, and the model's shared one) added to
q @ k^T before the Softmax (``adjust``, as Swin's), and LayerScale's gamma_1/gamma_2 products
(elementwise, into the residual Add).

Blocks: ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only ``mlp.fc1`` (both ``fc1_g`` and
``fc1_x`` of a SwiGLU MLP). An MLP's own LayerNorm before ``fc2`` (``scale_mlp``) is the eva
family's pair (``eva.py``: the timm MLP classes). A block is called with the model's shared
relative position bias as a keyword (``shared_rel_pos_bias``), and the blocks sit in an
``nn.ModuleList``, not a ``Sequential``.
"""

from __future__ import annotations

from .registry import Family, register_family


def qkv_projection(self, x):
    """timm's qkv projection of a BEiT/EVA attention with one qkv Linear (q and v biases beside it
    until ``move_qkv_bias`` has moved them in)."""
    import torch
    import torch.nn.functional as F

    if self.q_bias is None:
        return self.qkv(x)
    qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    if self.qkv_bias_separate:
        qkv = self.qkv(x)
        qkv += qkv_bias
        return qkv
    return F.linear(x, weight=self.qkv.weight, bias=qkv_bias)


def move_qkv_bias(module) -> None:
    """q_bias, k_bias (zeros) and v_bias passed to ``F.linear`` become the qkv Linear's bias: timm's
    forward then calls the Linear, the same ``F.linear`` with the same bias. With
    ``qkv_bias_separate`` (the bias added after the Linear) nothing moves: the Linear is called
    already and its bias is a float Add, as an export would see it."""
    import torch
    from torch import nn

    if getattr(module, "qkv", None) is None or module.q_bias is None or module.qkv_bias_separate \
            or module.qkv.bias is not None:
        return
    with torch.no_grad():
        bias = torch.cat((module.q_bias, module.k_bias, module.v_bias)).detach().clone()
    module.qkv.bias = nn.Parameter(bias, requires_grad=module.q_bias.requires_grad)
    module.q_bias, module.k_bias, module.v_bias = None, None, None


def mlp_input_linears(mlp) -> list[str]:
    """The Linears of a timm MLP that read its input: ``fc1``, or a SwiGLU's ``fc1_g`` and ``fc1_x``."""
    return [name for name in ("fc1", "fc1_g", "fc1_x") if hasattr(mlp, name)]


def _forward(self, x, shared_rel_pos_bias=None):
    B, N, C = x.shape
    qkv = qkv_projection(self, x)
    qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # B, num_heads, N, head_dim

    def adjust(attn):
        if self.relative_position_bias_table is not None:
            attn = attn + self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        return attn

    biased = self.relative_position_bias_table is not None or shared_rel_pos_bias is not None
    x = self.vq_attend(q * self.scale, k, v, adjust if biased else None)
    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    return self.proj_drop(x)


@register_family
class Beit(Family):
    name = "beit"
    description = "timm BEiT, BEiT v2"
    float_ops = ("BEiT relative position bias", "LayerScale Mul")
    short_names = {
        "beit_b": "beit_base_patch16_224",
        "beitv2_b": "beitv2_base_patch16_224",
    }

    def attention_forward(self, module):
        from timm.models.beit import Attention

        return _forward if isinstance(module, Attention) else None

    def prepare(self, module):
        from timm.models.beit import Attention

        if isinstance(module, Attention):
            move_qkv_bias(module)

    def norm_linear_pairs(self, module):
        from timm.models.beit import Block

        if not isinstance(module, Block):
            return []
        return [("norm1", "attn.qkv")] + [("norm2", f"mlp.{fc}") for fc in mlp_input_linears(module.mlp)]
