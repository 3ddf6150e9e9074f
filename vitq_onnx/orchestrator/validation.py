"""Validate the quantized graph and stamp it: onnxruntime against the simulation (bit-exactness)
and against the FP model (usefulness), then the metadata the model file carries."""

from __future__ import annotations

import sys

import onnx

from .. import runtime
from ..errors import VitqError
from ..recipe import Recipe
from ..validate import is_headless, validate_export
from .inputs import Inputs

LOW_FP_AGREEMENT = 0.5  # top-1 agreement (features: mean cosine) with the FP model below which an export is useless


def validate(qmodel: onnx.ModelProto, inputs: Inputs, recipe: Recipe, opts, say) -> dict:
    """The validation report; an error when onnxruntime does not compute what the simulation does."""
    say(f"validating onnxruntime against the PyTorch simulation and the FP model on {len(inputs.val_images)} "
        "calibration-folder images")
    report = validate_export(qmodel, inputs.model, recipe, inputs.val_images, opts.progress)
    headless = is_headless(inputs.model)  # a feature extractor: compared by cosine, not top-1
    if headless:
        say(f"bit-exact on {report['exact_images']:.2%} of the images, feature cosine to the simulation "
            f"min {report['sim_cosine_min']:.6f}; to the FP model mean {report['fp_cosine_mean']:.4f}")
        agreement, usefulness = report["exact_images"], report["fp_cosine_mean"]
    else:
        say(f"top-1 agreement {report['top1_agreement']:.2%}, max |dlogit| "
            f"{report['max_abs_logit_error']:.4f}, mean |dlogit| {report['mean_abs_logit_error']:.5f}; "
            f"top-1 agreement with the FP model {report['fp_top1_agreement']:.2%}")
        agreement, usefulness = report["top1_agreement"], report["fp_top1_agreement"]
    if agreement < opts.min_agreement:
        what = "is bit-exact with" if headless else "agrees with"
        raise VitqError(f"onnxruntime {what} the simulation on only {agreement:.1%} of the validation images "
                        f"(< {opts.min_agreement:.0%}); nothing written")
    if usefulness < LOW_FP_AGREEMENT:
        useless = (f"the quantized model's features have a mean cosine similarity of only {usefulness:.2f} to the FP "
                   f"model's (< {LOW_FP_AGREEMENT})" if headless else
                   f"the quantized model agrees with the FP model on only {usefulness:.0%} of the validation "
                   f"images (top-1, < {LOW_FP_AGREEMENT:.0%})")
        useless += ": it is likely useless; try more bits or another --method"
        if opts.strict:
            raise VitqError(useless + "; nothing written (--strict)")
        print(f"vitq-onnx: warning: {useless} (--strict refuses such a model)", file=sys.stderr)
        report["warnings"] = [useless]
    return report


def stamp(qmodel: onnx.ModelProto, inputs: Inputs, recipe: Recipe, bits, report: dict, opts) -> None:
    """What the model file says of itself: preprocessing, the recipe's summary, the validation."""
    runtime.set_metadata(qmodel, runtime.META_PREPROCESS, inputs.preprocess.to_dict())
    runtime.set_metadata(qmodel, runtime.META_RECIPE, {**({"mixed_precision": recipe.info["mixed_precision"]}
                                                          if "mixed_precision" in recipe.info else {}),
        **({"search": _search_summary(recipe.info["search"])} if "search" in recipe.info else {}),
        **({"checkpoint_adapted": recipe.info["checkpoint_adapted"]} if "checkpoint_adapted" in recipe.info else {}),
        "model": inputs.name, "method": recipe.method, "bits": recipe.info.get("bits", bits.to_dict()),
        "format": opts.format, "target_cpu": opts.target_cpu, "headless": is_headless(inputs.model),
        "tensor_bits": recipe.tensor_bits(), "float_ops": recipe.float_ops,
        "keep_float": recipe.keep_float, "float_layers": recipe.float_layers})
    runtime.set_metadata(qmodel, runtime.META_VALIDATION, report)
    qmodel.producer_name = "vitq-onnx"
    del qmodel.graph.value_info[:]  # intermediate shapes: in the --save-passes files, not the deliverable


def _search_summary(info: dict) -> dict:
    """What the model's metadata says of the search (the recipe has every pass)."""
    return {k: info[k] for k in ("kind", "fitness", "evaluations", "fitness_before", "fitness_after",
                                 "held_out_kl_before", "held_out_kl_after", "stopped")}
