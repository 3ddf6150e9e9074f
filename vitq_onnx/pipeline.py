"""``vitq-onnx export``: calibrate -> recipe -> FP32 ONNX -> passes -> validate -> write.

Nothing is written until the model has been built and validated, and then atomically (temporary
files in the output folder, renamed into place), so a failure never leaves half a file.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from . import runtime
from .calibration.bits import BitWidths
from .calibration.calibrate import calibrate
from .calibration.methods import get_method
from .calibration.state import CalibOptions
from .errors import VitqError
from .export import export_fp32
from .images import Preprocess, list_images, load_images
from .models import create_model, resolve_name
from .passes import FORMATS, PassContext, pipeline, run_passes
from .recipe import Recipe
from .simulation import simulate
from .validate import onnx_vs_simulation


def recipe_path(output: Path) -> Path:
    return output.with_name(output.stem + ".recipe.json")


@dataclass
class ExportOptions:
    model: str
    bits: str
    output: Path
    calib: Path
    weights: Path | None = None
    random_weights: bool = False
    num_calib: int | None = None  # None: the method's default
    method: str = "repq"
    layer_bits: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    time_budget: float | None = None  # minutes for the optimizing calibration stages
    format: str = "ort"
    save_passes: Path | None = None
    min_agreement: float = 0.9
    progress: bool = True
    recipe: Path | None = None  # deploy this recipe instead of calibrating (bits and method are its own)


def _check_output(output: Path, inputs: list[Path]) -> None:
    parent = output.parent
    if not parent.is_dir():
        raise VitqError(f"output folder does not exist: {parent}")
    if any(p is not None and output.resolve() == p.resolve() for p in inputs):
        raise VitqError(f"output {output} would overwrite an input")
    try:
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise VitqError(f"cannot write to {parent}: {exc.strerror}") from None


def calibration_subset(folder: Path, count: int) -> list[Path]:
    """A fixed random subset (seed 0) of the folder, so classes are spread, not alphabetical."""
    if count < 1:
        raise VitqError("--num-calib must be at least 1")
    paths = list_images(folder)
    if count < len(paths):
        paths = sorted(random.Random(0).sample(paths, count))
    return paths


def export(opts: ExportOptions) -> dict:
    """Run the whole export; returns the validation report stored in the model's metadata."""
    start = time.time()
    say = (lambda msg: print(msg, file=sys.stderr)) if opts.progress else (lambda msg: None)
    bits = BitWidths.parse(opts.bits, opts.layer_bits)
    method = get_method(opts.method)  # with a recipe: only its default number of validation images
    if opts.time_budget is not None and opts.time_budget <= 0:
        raise VitqError("--time-budget must be a positive number of minutes")
    timm_name = resolve_name(opts.model)
    if opts.format not in FORMATS:
        raise VitqError(f"unknown --format '{opts.format}': use {' or '.join(FORMATS)}")
    _check_output(opts.output, [opts.weights, opts.recipe, opts.recipe and opts.recipe.with_suffix(".npz")])
    if opts.recipe is not None and recipe_path(opts.output).resolve() == opts.recipe.resolve():
        raise VitqError(f"output {opts.output} would overwrite the input recipe {opts.recipe}")
    given = Recipe.load(opts.recipe) if opts.recipe is not None else None
    if given is not None and given.model != timm_name:
        raise VitqError(f"recipe {opts.recipe} is for {given.model}, not {timm_name}")
    calib_paths = calibration_subset(opts.calib, method.num_calib if opts.num_calib is None else opts.num_calib)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset, containers)

    model = create_model(opts.model, opts.weights, opts.random_weights)
    preprocess = Preprocess.from_model(model)
    images, used = load_images(calib_paths, preprocess)
    if given is None:
        say(f"calibrating {timm_name} at W{bits.w}/A{bits.a} ({method.name}) on {len(used)} images")
        recipe = calibrate(model, images, bits, method, timm_name, CalibOptions(
            opts.seed, opts.device, None if opts.time_budget is None else 60 * opts.time_budget, opts.progress))
    else:
        say(f"deploying the {given.method} recipe {opts.recipe} (no calibration)")
        recipe = given
    recipe.info["format"] = opts.format

    fp32 = export_fp32(model, preprocess.size)
    stored = {init.name for init in fp32.graph.initializer}  # parameters the exporter folded away stay float32
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    runtime.set_metadata(fp32, runtime.META_PREPROCESS, preprocess.to_dict())
    qmodel = run_passes(fp32, pipeline(recipe, opts.format), PassContext(recipe, opts.format), opts.save_passes,
                        opts.progress)

    say("validating onnxruntime against the PyTorch simulation on the calibration images")
    report = onnx_vs_simulation(qmodel, simulate(model, recipe), images)
    report["export_seconds"] = round(time.time() - start, 1)
    say(f"top-1 agreement {report['top1_agreement']:.2%}, max |dlogit| "
        f"{report['max_abs_logit_error']:.4f}, mean |dlogit| {report['mean_abs_logit_error']:.5f}")
    if report["top1_agreement"] < opts.min_agreement:
        raise VitqError(f"onnxruntime agrees with the simulation on only {report['top1_agreement']:.1%} "
                        f"of calibration images (< {opts.min_agreement:.0%}); nothing written")
    runtime.set_metadata(qmodel, runtime.META_PREPROCESS, preprocess.to_dict())
    runtime.set_metadata(qmodel, runtime.META_RECIPE, {
        "model": timm_name, "method": recipe.method, "bits": recipe.info.get("bits", bits.to_dict()),
        "format": opts.format,
        "tensor_bits": recipe.tensor_bits(), "float_ops": recipe.float_ops})
    runtime.set_metadata(qmodel, runtime.META_VALIDATION, report)
    qmodel.producer_name = "vitq-onnx"
    del qmodel.graph.value_info[:]  # intermediate shapes: in the --save-passes files, not the deliverable
    _write(qmodel, recipe, opts.output)
    say(f"wrote {opts.output} and {recipe_path(opts.output)} in {time.time() - start:.1f} s")
    return report


def _write(model: onnx.ModelProto, recipe: Recipe, output: Path) -> None:
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".vitq-") as tmp:
        tmp_model = Path(tmp) / "model.onnx"
        tmp_recipe = Path(tmp) / "recipe.json"
        onnx.save(model, tmp_model)
        recipe.save(tmp_recipe)
        final_recipe = recipe_path(output)
        os.replace(tmp_recipe.with_suffix(".npz"), final_recipe.with_suffix(".npz"))
        os.replace(tmp_recipe, final_recipe)
        os.replace(tmp_model, output)
