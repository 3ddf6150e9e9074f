"""``vitq-onnx export``: calibrate -> recipe -> FP32 ONNX -> passes -> validate -> write.

Outputs are checked before any work (``outputs.py``); nothing is written until the model has been
built and validated, and then all files at once, so a failure or Ctrl-C never leaves half a set.
The artifacts hold no timings or dates: the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from . import runtime
from .calibration.bits import BitWidths
from .calibration.calibrate import calibrate, refine
from .calibration.methods import SEARCH_IMAGES, Method, get_method, search_stage
from .calibration.mixed_precision import WIDTHS, choose_widths, widths_for_drop
from .calibration.state import CalibOptions
from .cpu import check_target
from .errors import VitqError
from .fp32 import export_fp32
from .images import Preprocess, label_of, list_images, load_images, load_synsets
from .models import build_args, build_args_text, create_model, resolve_name
from .outputs import check_outputs, staged
from .progress import StageTimes, sayer
from .passes import FORMATS, PassContext, pipeline, run_passes
from .recipe import Recipe
from .validate import is_headless, validate_export


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
    keep_float: tuple[str, ...] = ()  # module globs left float (--keep-float/--exclude)
    avg_bits: float | None = None  # greedy mixed precision within this average width (mixed_precision.py)
    max_drop: float | None = None  # greedy mixed precision within this top-1 drop on held-out calibration images
    seed: int = 0
    device: str = "cpu"
    time_budget: float | None = None  # minutes for the optimizing calibration stages
    search: str | None = None  # a search the calibration ends with ("evol": evol_search.py)
    search_budget: float | None = None  # minutes the search may take (None: its own cap)
    search_fitness: str = "infonce"
    format: str = "ort"
    target_cpu: str = "portable"  # "vnni": full-range 8-bit s8 operands, exact only with VNNI/AMX (cpu.py)
    save_passes: Path | None = None
    min_agreement: float = 0.9
    validate_images: int = 8  # calibration-folder images onnxruntime is checked on
    img_size: int | None = None  # the resolution the timm model is built at (None: its own)
    num_classes: int | None = None  # the classifier's classes (0: a headless feature extractor; None: its own)
    strict: bool = False  # below LOW_FP_AGREEMENT with the FP model: an error, not a warning
    progress: bool = True
    recipe: Path | None = None  # deploy this recipe instead of calibrating (bits and method are its own)


LOW_FP_AGREEMENT = 0.5  # top-1 agreement (features: mean cosine) with the FP model below which an export is useless


def _check_snapshot_folder(folder: Path, inputs: list[Path]) -> None:
    """--save-passes writes NN_<pass>.onnx there: it must be a folder and hold no input by such a name."""
    if folder.exists() and not folder.is_dir():
        raise VitqError(f"--save-passes {folder} is a file, not a folder")
    for path in inputs:
        if path is not None and path.parent.resolve() == folder.resolve() \
                and re.fullmatch(r"\d\d_\w+\.onnx", path.name):
            raise VitqError(f"--save-passes {folder} would overwrite the input {path}")


def output_files(output: Path) -> list[Path]:
    """Every file an export writes: the model and its recipe (.json + .npz)."""
    return [output, recipe_path(output), recipe_path(output).with_suffix(".npz")]


def calibration_subset(paths: list[Path], count: int, option: str = "--num-calib") -> list[Path]:
    """A fixed random subset (seed 0) of a folder's images (``list_images``), so classes are
    spread, not alphabetical."""
    if count < 1:
        raise VitqError(f"{option} must be at least 1")
    if count < len(paths):
        paths = sorted(random.Random(0).sample(paths, count))
    return paths


def check_options(opts: ExportOptions):
    """The options' own errors, before any work; the calibration method they name."""
    BitWidths.parse(opts.bits, opts.layer_bits, opts.keep_float)
    method = get_method(opts.method)  # with a recipe: unused, but a wrong name is still an error
    if opts.avg_bits is not None and not WIDTHS[-1] <= opts.avg_bits <= WIDTHS[0]:
        raise VitqError(f"--avg-bits must be between {WIDTHS[-1]} and {WIDTHS[0]}")
    if opts.avg_bits is not None and opts.max_drop is not None:
        raise VitqError("--avg-bits and --max-drop each choose the bit map: give one")
    if opts.max_drop is not None and not opts.max_drop > 0:
        raise VitqError("--max-drop must be a positive number of top-1 points")
    for option, value in (("--avg-bits", opts.avg_bits), ("--max-drop", opts.max_drop)):
        if value is not None and opts.layer_bits:
            raise VitqError(f"{option} chooses every layer's width: drop --layer-bits")
    if opts.time_budget is not None and opts.time_budget <= 0:
        raise VitqError("--time-budget must be a positive number of minutes")
    if opts.format not in FORMATS:
        raise VitqError(f"unknown --format '{opts.format}': use {' or '.join(FORMATS)}")
    check_target(opts.target_cpu, "--target-cpu vnni")  # validated here: onnxruntime must run it exactly
    if opts.search is not None:
        search_stage(opts.search, opts.search_budget, opts.search_fitness)
    elif opts.search_budget is not None or opts.search_fitness != "infonce":
        raise VitqError("--search-budget and --search-fitness set up a search: add --search evol")
    return method


def write(qmodel: onnx.ModelProto, recipe: Recipe, output: Path) -> None:
    """The model and its recipe, all or nothing (``outputs.staged``)."""
    with staged(output.parent) as tmp:
        onnx.save(qmodel, tmp / output.name)
        recipe.save(tmp / recipe_path(output).name)


def quantize(model: torch.nn.Module, timm_name: str, preprocess: Preprocess, images: np.ndarray | None,
             val_images: np.ndarray, opts: ExportOptions, given: Recipe | None = None,
             times: StageTimes | None = None, held: tuple[np.ndarray, np.ndarray] | None = None,
             ) -> tuple[onnx.ModelProto, Recipe, dict]:
    """Calibrate ``model`` on ``images`` (or deploy ``given``), rewrite its FP32 graph and validate it
    on ``val_images``: the quantized ONNX model (with its metadata), its recipe and the validation
    report. ``held`` (images, labels): calibration-folder images that do not calibrate, for
    ``--max-drop``. Nothing is read or written here: ``export`` (the CLI) and ``api.export`` share it."""
    times = StageTimes() if times is None else times
    say = sayer(opts.progress)
    bits, method = BitWidths.parse(opts.bits, opts.layer_bits, opts.keep_float), get_method(opts.method)
    model_args = build_args(opts.img_size, opts.num_classes)
    if given is None and opts.avg_bits is not None:
        with times("mixed precision"):
            bits, mixed = choose_widths(model, images, bits, opts.avg_bits, timm_name, say, opts.progress,
                                        method.trains_quantized_weights)
    if given is None and opts.max_drop is not None:
        with times("mixed precision"):
            bits, mixed = widths_for_drop(model, images, held, bits, opts.max_drop, timm_name, say, opts.progress)
    options = CalibOptions(opts.seed, opts.device, None if opts.time_budget is None else 60 * opts.time_budget,
                           opts.progress, times)
    search = () if opts.search is None else (search_stage(opts.search, opts.search_budget, opts.search_fitness),)
    if given is None:
        at = "the mixed-precision map" if bits.rules and not opts.layer_bits else f"W{bits.w}/A{bits.a}"
        say(f"calibrating {timm_name} at {at} ({method.name}{' + ' + opts.search if search else ''}) "
            f"on {len(images)} images")
        recipe = calibrate(model, images, bits, Method(method.name, method.description, method.stages + search),
                           timm_name, options)
        if model_args:
            recipe.info["model_args"] = model_args
        if opts.avg_bits is not None or opts.max_drop is not None:
            recipe.info["mixed_precision"] = mixed
    elif search:
        say(f"refining the {given.method} recipe {opts.recipe} with the {opts.search} search on {len(images)} images")
        recipe = refine(model, given, images, search, options)
    else:
        say(f"deploying the {given.method} recipe {opts.recipe} (no calibration)")
        recipe = given
    recipe.info["format"] = opts.format

    with times("FP32 ONNX export"):
        fp32 = export_fp32(model, preprocess.size)
    stored = {init.name for init in fp32.graph.initializer}  # parameters the exporter folded away stay float32
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    runtime.set_metadata(fp32, runtime.META_PREPROCESS, preprocess.to_dict())
    with times("ONNX passes"):
        qmodel = run_passes(fp32, pipeline(recipe, opts.format), PassContext(recipe, opts.format, opts.target_cpu),
                            opts.save_passes, opts.progress)

    say(f"validating onnxruntime against the PyTorch simulation and the FP model on {len(val_images)} "
        "calibration-folder images")
    with times("validation"):
        report = validate_export(qmodel, model, recipe, val_images, opts.progress)
    headless = is_headless(model)  # a feature extractor: compared by cosine, not top-1
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
    runtime.set_metadata(qmodel, runtime.META_PREPROCESS, preprocess.to_dict())
    runtime.set_metadata(qmodel, runtime.META_RECIPE, {**({"mixed_precision": recipe.info["mixed_precision"]}
                                                          if "mixed_precision" in recipe.info else {}),
        **({"search": _search_summary(recipe.info["search"])} if "search" in recipe.info else {}),
        "model": timm_name, "method": recipe.method, "bits": recipe.info.get("bits", bits.to_dict()),
        "format": opts.format, "target_cpu": opts.target_cpu, "headless": headless,
        "tensor_bits": recipe.tensor_bits(), "float_ops": recipe.float_ops,
        "keep_float": recipe.keep_float, "float_layers": recipe.float_layers})
    runtime.set_metadata(qmodel, runtime.META_VALIDATION, report)
    qmodel.producer_name = "vitq-onnx"
    del qmodel.graph.value_info[:]  # intermediate shapes: in the --save-passes files, not the deliverable
    return qmodel, recipe, report


MIN_HELD_OUT = 32  # labelled calibration images --max-drop needs beyond those that calibrate


def held_out(calib_all: list[Path], calib_paths: list[Path], root: Path, preprocess: Preprocess):
    """The calibration folder's images that do not calibrate, with their labels (synset names)."""
    calibrating = set(calib_paths)
    rest = [p for p in calib_all if p not in calibrating]
    if len(rest) < MIN_HELD_OUT:
        raise VitqError(f"--max-drop measures top-1 on calibration images that do not calibrate: only {len(rest)} "
                        f"are left, it needs {MIN_HELD_OUT} (add images to --calib or lower --num-calib)")
    synsets = load_synsets()
    try:
        labels = {p: label_of(p, root, synsets) for p in rest}
    except VitqError as e:
        raise VitqError(f"--max-drop needs labelled calibration images: {e}") from None
    images, kept = load_images(rest, preprocess)
    return images, np.array([labels[p] for p in kept])


def _search_summary(info: dict) -> dict:
    """What the model's metadata says of the search (the recipe has every pass)."""
    return {k: info[k] for k in ("kind", "fitness", "evaluations", "fitness_before", "fitness_after",
                                 "held_out_kl_before", "held_out_kl_after", "stopped")}


def export(opts: ExportOptions) -> dict:
    """Run the whole export; returns the validation report (stored in the model's metadata), the
    export's seconds and each stage's (not stored: the artifacts are reproducible byte for byte)."""
    start, times = time.time(), StageTimes()
    say = sayer(opts.progress)
    method = check_options(opts)
    timm_name = resolve_name(opts.model)
    calib_all = list_images(opts.calib)
    inputs = [opts.weights, opts.recipe, opts.recipe and opts.recipe.with_suffix(".npz"), *calib_all]
    check_outputs(output_files(opts.output), inputs)
    if opts.save_passes is not None:
        _check_snapshot_folder(opts.save_passes, inputs)
    given = Recipe.load(opts.recipe) if opts.recipe is not None else None
    if given is not None and given.model != timm_name:
        raise VitqError(f"recipe {opts.recipe} is for {given.model}, not {timm_name}")
    model_args = build_args(opts.img_size, opts.num_classes)
    if given is not None and given.info.get("model_args", {}) != model_args:
        raise VitqError(f"recipe {opts.recipe} was calibrated for a model built with "
                        f"{build_args_text(given.info.get('model_args'))}, not {build_args_text(model_args)}")
    default_count = method.num_calib if opts.search is None else max(method.num_calib, SEARCH_IMAGES)
    calib_paths = calibration_subset(calib_all, default_count if opts.num_calib is None else opts.num_calib)
    val_paths = calibration_subset(calib_all, opts.validate_images, "--validate-images")
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset, containers)

    with times("load model and images"):
        model = create_model(opts.model, opts.weights, opts.random_weights, **model_args)
        preprocess = Preprocess.from_model(model)
        images = load_images(calib_paths, preprocess)[0] if given is None or opts.search else None
        val_images, _ = load_images(val_paths, preprocess)
        held = None if opts.max_drop is None or given is not None else held_out(calib_all, calib_paths, opts.calib,
                                                                                 preprocess)
    qmodel, recipe, report = quantize(model, timm_name, preprocess, images, val_images, opts, given, times, held)
    with times("write"):
        write(qmodel, recipe, opts.output)
    seconds = round(time.time() - start, 1)
    say(f"wrote {opts.output} and {recipe_path(opts.output)} in {seconds} s")
    return {**report, "export_seconds": seconds, "stage_seconds": {k: round(v, 2) for k, v in times.items()},
            "stage_peak_mb": {k: round(v) for k, v in times.peak_mb.items()}}

