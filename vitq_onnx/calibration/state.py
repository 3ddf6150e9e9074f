"""What calibration stages share: the model being quantized, its quant points and the recipe so far.

Stages read and extend this state in order (``calibrate.py``). The model is a copy of the user's,
instrumented with quant points; after the weight stage its quantized layers hold dequantized
weights, and ``fp_weights`` keeps the float ones (after any reparameterization fold), which
reconstruction trains as latent weights.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..recipe import Recipe, WeightQuant
from .bits import BitWidths
from ..progress import Progress, StageTimes
from .quant_points import Instrumented
from .quantizers.weights import fake_weight, weight_codes


@dataclass(frozen=True)
class CalibOptions:
    seed: int = 0
    device: str = "cpu"
    deadline: float | None = None  # time.time() by which calibration must end (--time-budget); None: no limit
    progress: bool = True
    times: StageTimes | None = None  # filled with each stage's seconds when given


@dataclass
class CalibState:
    fp_model: nn.Module  # the user's float model, never modified
    model: nn.Module  # the copy being quantized
    inst: Instrumented
    images: torch.Tensor  # calibration batch, on the calibration device
    bits: BitWidths
    recipe: Recipe
    options: CalibOptions = field(default_factory=CalibOptions)
    fp_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> float weight
    ref_biases: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> bias before corrections
    retrained: set[str] = field(default_factory=set)  # weight keys whose float weight a stage trained
    stage_deadline: float | None = None  # when the running optimizing stage must end (calibrate._run_stages)

    @torch.no_grad()
    def keep_float_reference(self) -> None:
        """Record the float weights and (Linear) biases the exported graph starts from, once."""
        for key, mod in self.inst.weights.items():
            self.fp_weights.setdefault(key, mod.weight.detach().clone())
            if mod.bias is not None and isinstance(mod, nn.Linear) and key not in self.ref_biases:
                self.ref_biases[key] = mod.bias.detach().clone()  # bias corrections: Linears

    def float_model(self) -> nn.Module:
        """A copy of the user's float model on the calibration device (``fp_model`` stays where
        and as it is), for the stages that compare against its outputs."""
        return copy.deepcopy(self.fp_model).eval().to(self.images.device)

    def say(self, msg: str) -> None:
        if self.options.progress:
            print(msg, file=sys.stderr)

    def progress(self, total: int, desc: str, unit: str = "it") -> Progress:
        return Progress(total, desc, self.options.progress, unit)

    @torch.no_grad()
    def set_weight(self, key: str, scale: torch.Tensor) -> None:
        """Quantize one layer's float weight with ``scale`` (per output channel) into the model."""
        mod, bits = self.inst.weights[key], self.bits.weight(key)
        mod.weight.copy_(fake_weight(self.fp_weights[key], scale, bits))
        # a retrained weight is not the graph's: the recipe carries its codes
        codes = weight_codes(self.fp_weights[key], scale, bits).cpu().numpy().astype(np.int8) \
            if key in self.retrained else None
        self.recipe.weights[key] = WeightQuant(bits, scale.cpu().numpy().astype(np.float32), codes)

    @torch.no_grad()
    def set_bias_correction(self, key: str, delta: torch.Tensor) -> None:
        """bias = float bias + delta, in the model and (as delta) in the recipe, as the passes add it."""
        self.inst.weights[key].bias.copy_(self.ref_biases[key] + delta)
        self.recipe.bias_corrections[key.rpartition(":")[0]] = delta.cpu().numpy().astype(np.float32)
