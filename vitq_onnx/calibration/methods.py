"""Calibration methods: which quantizer each kind of tensor gets. New methods register here."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VitqError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    channelwise_post_norm: bool = False  # RepQ-ViT: per-channel post-LayerNorm, reparameterized
    # RepQ-ViT's log-sqrt(2) post-Softmax quantizer (deployed as base-2 shifts) up to this many
    # bits; above, uniform, which onnxruntime runs much faster. At W4/A4 log2 wins by over 20
    # points; at W6/A6 by about one (README ablation), so ``repq-log2`` is there to choose it.
    log2_softmax_max_bits: int = 0

    def log2_softmax(self, a_bits: int) -> bool:
        return a_bits <= self.log2_softmax_max_bits


METHODS = {
    m.name: m
    for m in (
        Method("basic", "per-tensor uniform activations, MSE-searched ranges"),
        Method("repq-cw", "basic + RepQ-ViT channel-wise post-LayerNorm reparameterization",
               channelwise_post_norm=True),
        Method("repq", "RepQ-ViT: channel-wise post-LayerNorm reparameterization + log2 post-Softmax "
               "(at <= 4 bits)", channelwise_post_norm=True, log2_softmax_max_bits=4),
        Method("repq-log2", "repq with the log2 post-Softmax quantizer at every bit width (as published)",
               channelwise_post_norm=True, log2_softmax_max_bits=8),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise VitqError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]
