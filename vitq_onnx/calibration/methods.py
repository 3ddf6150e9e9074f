"""Calibration methods: which quantizer each kind of tensor gets. New methods register here."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VitqError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    channelwise_post_norm: bool = False  # RepQ-ViT: per-channel post-LayerNorm, reparameterized
    log2_softmax: bool = False  # RepQ-ViT: log-sqrt(2) post-Softmax, deployed as base-2 shifts


METHODS = {
    m.name: m
    for m in (
        Method("basic", "per-tensor uniform activations, MSE-searched ranges"),
        Method("repq-cw", "basic + RepQ-ViT channel-wise post-LayerNorm reparameterization",
               channelwise_post_norm=True),
        Method("repq", "RepQ-ViT: channel-wise post-LayerNorm reparameterization + log2 post-Softmax",
               channelwise_post_norm=True, log2_softmax=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise VitqError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]
