"""The export, start to end; ``cli.py`` and ``api.py`` are its only callers.

    inputs.prepare             check every option, the machine and the outputs; load the model and images
    widths.choose              the bit map (uniform, or mixed precision)
    recipe_source.make_recipe  calibrate with the method, refine a recipe with a search, or deploy one as is
    lowering.lower             the FP32 graph, then the ONNX passes the recipe needs
    validation.validate        onnxruntime against the simulation and the FP model
    validation.stamp           the metadata the model carries
    write                      the model and its recipe, all or nothing

Nothing is written until the model has been built and validated, and then all files at once, so
a failure or Ctrl-C never leaves half a set. The artifacts hold no timings or dates: the same
inputs give the same bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

from ..outputs import staged
from ..progress import StageTimes, sayer
from ..recipe import Recipe, recipe_path
from .inputs import prepare
from .lowering import lower
from .recipe_source import make_recipe
from .validation import stamp, validate
from .widths import choose


def quantize(opts, model: torch.nn.Module | None = None, arrays: np.ndarray | None = None,
             times: StageTimes | None = None) -> tuple[onnx.ModelProto, Recipe, dict]:
    """The quantized model (with its metadata), its recipe and the validation report; nothing is
    written. ``model``, ``arrays``: a module and preprocessed images instead of ``opts.model`` and
    the folder ``opts.calib`` (``inputs.prepare``)."""
    started, times = time.time(), StageTimes() if times is None else times
    say = sayer(opts.progress)
    inputs = prepare(opts, times, model, arrays)
    bits, mixed = choose(inputs, opts, times, say)
    recipe = make_recipe(inputs, bits, mixed, opts, times, say, started)
    qmodel = lower(inputs.model, recipe, inputs.preprocess, opts.format, opts.target_cpu, opts.save_passes,
                   opts.progress, times)
    with times("validation"):
        report = validate(qmodel, inputs, recipe, opts, say)
    stamp(qmodel, inputs, recipe, bits, report, opts)
    return qmodel, recipe, report


def write(qmodel: onnx.ModelProto, recipe: Recipe, output: Path) -> None:
    """The model and its recipe, all or nothing (``outputs.staged``)."""
    with staged(output.parent) as tmp:
        onnx.save(qmodel, tmp / output.name)
        recipe.save(tmp / recipe_path(output).name)


def export(opts) -> dict:
    """The whole export from files to files; returns the validation report (stored in the model's
    metadata), the export's seconds and each stage's (not stored: the artifacts are reproducible)."""
    start, times = time.time(), StageTimes()
    qmodel, recipe, report = quantize(opts, times=times)
    with times("write"):
        write(qmodel, recipe, opts.output)
    seconds = round(time.time() - start, 1)
    sayer(opts.progress)(f"wrote {opts.output}, {recipe_path(opts.output)} and "
                         f"{recipe_path(opts.output).with_suffix('.npz')} in {seconds} s" + (
                             f" ({seconds / 60:.1f} of the {opts.time_budget:g}-minute budget)"
                             if opts.time_budget is not None else ""))
    return {**report, "export_seconds": seconds, "stage_seconds": {k: round(v, 2) for k, v in times.items()},
            "stage_peak_mb": {k: round(v) for k, v in times.peak_mb.items()}}
