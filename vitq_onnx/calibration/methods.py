"""Calibration methods: named compositions of stages, registered like timm's models.

    @register_method
    def repq():
        \"\"\"One-line description shown by ``vitq-onnx export --help``.\"\"\"
        return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(...)]

The function's name (underscores as dashes) is the method's name for ``--method``. A method's
stages are built when first used; the stage modules load then too (``lazy_import``), so the
command line lists the methods without importing torch.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable

from ..errors import VitqError
from ..lazy import lazy_import

stages = lazy_import("vitq_onnx.calibration.stages")
reconstruct = lazy_import("vitq_onnx.calibration.reconstruct")
smooth_bias = lazy_import("vitq_onnx.calibration.smooth_bias")
evol_search = lazy_import("vitq_onnx.calibration.evol_search")


class Method:
    """A named list of stages; ``stages`` is a tuple, or a function that builds them on first use."""

    def __init__(self, name: str, description: str, stages: tuple | Callable[[], list], num_calib: int = 32,
                 sensitivity: str = "repq"):
        self.name, self.description, self.num_calib = name, description, num_calib
        self.sensitivity = sensitivity  # the method whose recipes --avg-bits/--max-drop measure and compare
        self._stages = stages

    @cached_property
    def stages(self) -> tuple:
        return tuple(self._stages() if callable(self._stages) else self._stages)

    @property
    def softmax_kind(self) -> Callable[[int], str]:
        """Its post-Softmax quantizer kind by width (its activation stage's; uniform without one)."""
        fits = [s for s in self.stages if isinstance(s, stages.FitActivations)]
        return fits[0].softmax_kind if fits else (lambda bits: "uniform")

    @property
    def trains_quantized_weights(self) -> bool:
        """Does a stage reconstruct the quantized weights (which heals narrow weights)?"""
        return any(isinstance(s, reconstruct.BlockReconstruction) and s.quantized_weights for s in self.stages)


METHODS: dict[str, Method] = {}


def register_method(fn: Callable[[], list] = None, *, num_calib: int = 32, sensitivity: str = "repq"):
    """``num_calib``: its default calibration images; ``sensitivity``: the (fast) method whose
    recipes mixed precision measures and compares for it."""
    def register(f):
        name = f.__name__.replace("_", "-")
        doc = (f.__doc__ or "").strip().splitlines()
        METHODS[name] = Method(name, doc[0] if doc else name, f, num_calib, sensitivity)
        return f

    return register(fn) if fn is not None else register


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise VitqError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]


# --method auto, the default: the method for the narrowest width asked (weights or activations),
# as (narrowest width at least, method), the first that holds. Chosen on calibration images held
# out from calibration (KL to FP32 on 32 of them, DeiT-Ti; docs/methods.md#the-default-method-auto),
# and on time where those did not separate: 7-8 bits `repq` (seconds; reconstruction has nothing
# left to gain at FP32's top-1); 5-6 bits `ias` (W6/A6 KL 0.049 in its W6 schedule against repq's
# 0.073); 4 bits `repq-recon` (KL 0.308 against repq's 0.815, in two thirds of ias's time); 3 bits
# `ias` (its float-weight stage: KL 1.604).
AUTO = ((7, "repq"), (5, "ias"), (4, "repq-recon"), (0, "ias"))


def auto_table() -> str:
    """AUTO as ``--help`` and the export's printout say it."""
    return ", ".join(f"{least}+ bits: {name}" for least, name in AUTO)


def auto_method(narrowest: int) -> Method:
    """The method ``--method auto`` takes for ``narrowest``-bit weights or activations (AUTO)."""
    return get_method(next(name for least, name in AUTO if narrowest >= least))


def log2_up_to(max_bits: int) -> Callable[[int], str]:
    """Post-Softmax kind: RepQ-ViT's log2 quantizer up to ``max_bits``, uniform (faster) above."""
    return lambda bits: "log2" if bits <= max_bits else "uniform"


# Which post-Softmax quantizer at which width, by KL to the float model on 32 held-out calibration
# images (benchmarks/recon_settings.py, repq vs repq-log2, DeiT-Ti): log2 0.205 against uniform
# 0.478 at 5 bits, 0.073 against 0.102 at 6, but 0.042 against 0.029 at 7; at 4 bits log2 wins by
# over 20 points of top-1. Uniform at 7-8 bits is also what onnxruntime runs fastest.
# The log2-table quantizer (ias's at 6-7 bits) lowered the KL of repq at uniform 6 and 7 bits too
# (0.039 against 0.073, 0.013 against 0.029) but its first version raised that of repq's
# --avg-bits 5 map (0.168 against 0.153): repq keeps log2 and uniform.
REPQ_SOFTMAX = log2_up_to(6)


@register_method
def basic():
    """per-tensor uniform activations, MSE-searched ranges"""
    return [stages.FitWeights(), stages.FitActivations()]


@register_method
def repq_cw():
    """basic + RepQ-ViT channel-wise post-LayerNorm reparameterization"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations()]


@register_method
def repq():
    """RepQ-ViT: channel-wise post-LayerNorm reparameterization + log2 post-Softmax (at <= 6 bits)"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(REPQ_SOFTMAX)]


@register_method
def repq_log2():
    """repq with the log2 post-Softmax quantizer at every bit width (as published)"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(log2_up_to(8))]


@register_method(num_calib=128)
def repq_recon():
    """repq + block-wise reconstruction of weights, biases and quantizer scales (Adam, cosine)"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(REPQ_SOFTMAX),
            reconstruct.BlockReconstruction()]


# I&S-ViT (Zhong et al. 2023): SULQ post-Softmax quantizers and the smooth optimization strategy.
# RepQ-ViT's fold of the channel-wise post-LayerNorm quantizers (SOS stage 2) is exact: the
# per-tensor quantizer on the folded LayerNorm output gives the same codes and the folded Linear
# the same output as the channel-wise quantizer did, so the engine folds first and SOS stage 1
# trains that same function (float weights, channel-wise quantization) in the folded coordinates.
IAS_STAGE1_ITERS = 100
IAS_STAGE3_ITERS = 200
# wider than 4 bits, a fifth of those, as the paper's schedule (1000 iterations at W3/W4, 200 at
# W6): on held-out calibration images at W6/A6 the KL to FP32 was the same (0.049 against 0.048)
# in a quarter of the time (204 s against 793 s; docs/results.md)
IAS_WIDE_DIVISOR = 5


def sulq(bits: int) -> str:
    """SULQ up to 4 bits, log√2 at 5, the log2-table quantizer at 6-7, uniform at 8. SULQ's levels
    are powers of two (minus eta), at most j + 2 distinct ones for eta = 2^-j (j <= 10): 16 codes
    use them, 32 or 64 cannot (measured at W6/A6: docs/results.md); log√2's shifts keep 16 levels too. The
    log2-table quantizer uses all 2^b codes. KL to FP32 on 32 held-out calibration images
    (benchmarks/recon_settings.py): ``ias`` at W6/A6 0.043 against 0.049 with log√2; ``repq``
    (no reconstruction) with it 0.039 against 0.073 at 6 bits, 0.013 against uniform's 0.029 at
    7, but about the same as log√2 at 5 (0.200 against 0.205; 0.233 with its first version),
    where log√2's shifts stay."""
    return "sulq" if bits <= 4 else "log2" if bits == 5 else "log2-table" if bits <= 7 else "uniform"


@register_method(num_calib=128)
def ias():
    """I&S-ViT: SULQ post-Softmax + smooth optimization (float-weight, then quantized block reconstruction)"""
    return [stages.ChannelwiseReparam(), stages.FitActivations(sulq, weights=False),
            reconstruct.BlockReconstruction(iters=IAS_STAGE1_ITERS, learn=("weights", "biases"),
                                            quantized_weights=False, fisher=False,
                                            wide_iters=IAS_STAGE1_ITERS // IAS_WIDE_DIVISOR),
            stages.FitWeights(),
            reconstruct.BlockReconstruction(iters=IAS_STAGE3_ITERS, wide_iters=IAS_STAGE3_ITERS // IAS_WIDE_DIVISOR)]


@register_method
def ias_sulq():
    """ablation: repq with SULQ post-Softmax quantizers (no reconstruction)"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(sulq)]


@register_method(num_calib=128)
def ias_stage3():
    """ablation: ias without its float-weight stage (SULQ + quantized block reconstruction only)"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(sulq),
            reconstruct.BlockReconstruction(iters=IAS_STAGE3_ITERS, wide_iters=IAS_STAGE3_ITERS // IAS_WIDE_DIVISOR)]



# MPTQ-ViT (Tai et al. 2024): SmoothQuant with bias instead of RepQ-ViT's channel-wise fold, and the
# fc2 input ranged by fc2's output error (smooth_bias.py). Its greedy mixed precision works with any
# method: --avg-bits (mixed_precision.py).
@register_method
def mptq():
    """MPTQ-ViT: SmoothQuant with bias (alpha searched per norm) + OPT-m post-GELU ranges"""
    return [smooth_bias.SmoothBias(), stages.FitWeights(), stages.FitActivations(REPQ_SOFTMAX, opt_m=True)]


@register_method
def mptq_sqb():
    """ablation: mptq without OPT-m (SmoothQuant with bias only)"""
    return [smooth_bias.SmoothBias(), stages.FitWeights(), stages.FitActivations(REPQ_SOFTMAX)]


@register_method
def repq_optm():
    """ablation: repq + OPT-m post-GELU ranges"""
    return [stages.ChannelwiseReparam(), stages.FitWeights(), stages.FitActivations(REPQ_SOFTMAX, opt_m=True)]


# Searches: refinements any method can end with (``--search``), or an earlier export's recipe.
SEARCH_IMAGES = 96  # calibration images a search wants (a quarter held out), when --num-calib is not given
SEARCHES = {"evol": lambda **settings: evol_search.EvolSearch(**settings)}  # --search name -> its stage
FITNESSES = ("infonce", "mse")  # what a search minimizes against the FP logits (evol_search.FITNESS's keys)


def search_stage(name: str, budget_min: float | None = None, fitness: str = "infonce"):
    """The named search as a stage; ``budget_min`` caps its minutes (default: its own cap)."""
    if name not in SEARCHES:
        raise VitqError(f"unknown --search '{name}': use one of {', '.join(SEARCHES)}")
    if fitness not in FITNESSES:
        raise VitqError(f"unknown --search-fitness '{fitness}': use one of {', '.join(FITNESSES)}")
    if budget_min is not None and budget_min <= 0:
        raise VitqError("--search-budget must be a positive number of minutes")
    extra = {} if budget_min is None else {"budget": 60 * budget_min}
    return SEARCHES[name](fitness=fitness, **extra)
