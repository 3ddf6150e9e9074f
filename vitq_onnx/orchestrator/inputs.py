"""What an export starts from: the FP model, its preprocessing, the calibration and validation
images, held-out labelled images for ``--max-drop`` and a given ``--recipe``; checked before any work.

From files (the CLI, or the API given a name and a folder), or from what a script holds (a module,
preprocessed arrays). Outputs are checked here too, so that nothing heavy runs before a wrong
``-o`` is found.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..calibration.bits import BitWidths
from ..calibration.methods import SEARCH_IMAGES, Method, auto_method, get_method
from ..cpu import check_target
from ..errors import VitqError
from ..images import Preprocess, calibration_subset, label_of, list_images, load_images, load_synsets
from .. import hf_models
from ..models import build_args, build_args_text, build_model, prepare_model, resolve_name
from ..outputs import check_outputs
from ..progress import StageTimes, sayer
from ..recipe import Recipe, export_files

MIN_HELD_OUT = 32  # labelled calibration images --max-drop needs beyond those that calibrate


@dataclass
class Inputs:
    model: torch.nn.Module
    name: str  # the timm name (or the module's class name)
    preprocess: Preprocess
    images: np.ndarray | None  # calibration images; None when a recipe is deployed as it is
    val_images: np.ndarray  # the images onnxruntime is checked on against the simulation
    method: Method
    bits: BitWidths  # --bits with its --layer-bits and --keep-float rules
    given: Recipe | None = None  # --recipe
    held: tuple[np.ndarray, np.ndarray] | None = None  # --max-drop: held-out images and labels
    adapted: tuple[str, ...] = ()  # what was changed to make the checkpoint fit (a resampled position embedding)


def check(opts) -> tuple[Method, BitWidths]:
    """The checks that read more than the options (``options.check_options`` ran first): the CPU
    the file is for; the method and the parsed bit map."""
    check_target(opts.target_cpu, "--target-cpu vnni")  # validated here: onnxruntime must run it exactly
    bits = BitWidths.parse(opts.bits, opts.layer_bits, opts.keep_float)
    return (auto_method(narrowest(opts, bits)) if opts.method == "auto" else get_method(opts.method)), bits


def narrowest(opts, bits: BitWidths) -> int:
    """The narrowest width the export may give a layer: --bits and --layer-bits, or the average
    --avg-bits asks (rounded down; --max-drop narrows from --bits)."""
    widths = [bits.w, bits.a, *(w for _, *pair in bits.rules for w in pair)]
    if opts.avg_bits is not None:
        widths.append(int(opts.avg_bits))
    return min(widths)


def calibration_count(opts, method: Method) -> int:
    default = method.num_calib if opts.search is None else max(method.num_calib, SEARCH_IMAGES)
    return default if opts.num_calib is None else opts.num_calib


def prepare(opts, times: StageTimes, model: torch.nn.Module | None = None,
            arrays: np.ndarray | None = None) -> Inputs:
    """Check, then load: the model by ``opts.model`` unless a ``model`` module is given, the images
    from the folder ``opts.calib`` unless preprocessed ``arrays`` [N, 3, H, W] are (then the first
    ``num_calib`` calibrate and the first ``validate_images`` validate). Every output is checked
    before anything is loaded."""
    method, bits = check(opts)
    if model is None:
        name = resolve_name(opts.model)
    else:
        if opts.img_size is not None or opts.num_classes is not None or opts.weights is not None:
            raise VitqError("--img-size, --num-classes and --weights build a model by name: set them on your "
                            "module instead")
        if hf_models.is_tower(model):
            model = hf_models.wrap(model)
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        if isinstance(model, hf_models.HFVision):  # the name --model hf:DIR gives the same folder
            folder = Path(getattr(model.tower.config, "_name_or_path", "") or model.architecture)
            name = f"{hf_models.PREFIX}{folder.resolve().name}/{model.architecture}"
    if arrays is not None and opts.max_drop is not None:
        raise VitqError("--max-drop measures top-1 on labelled held-out images: give --calib as a folder")
    calib_all = list_images(opts.calib) if arrays is None else []
    check_files(opts, [opts.weights, opts.recipe, opts.recipe and opts.recipe.with_suffix(".npz"), *calib_all])
    given = _given_recipe(opts, name)
    count = calibration_count(opts, method)
    if arrays is None:
        calib_paths = calibration_subset(calib_all, count)
        val_paths = calibration_subset(calib_all, opts.validate_images, "--validate-images")
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset, containers)
    adapted = []
    with times("load model and images"):
        if model is None:
            model, adapted = build_model(opts.model, opts.weights, opts.random_weights,
                                         **build_args(opts.img_size, opts.num_classes))
            for note in adapted:
                sayer(opts.progress)(f"weights {opts.weights.name}: {note}")
        else:  # the caller's module stays as it was: calibration works on a prepared copy
            model = prepare_model(copy.deepcopy(model))
        preprocess = Preprocess.from_model(model)
        if arrays is not None:
            want = (3, preprocess.size, preprocess.size)
            if arrays.ndim != 4 or arrays.shape[1:] != want:
                raise VitqError(f"calib images must be preprocessed arrays of shape [3, {preprocess.size}, "
                                f"{preprocess.size}] (or batches of them), got {tuple(arrays.shape)}")
            return Inputs(model, name, preprocess, arrays[:count], arrays[:opts.validate_images], method, bits,
                          given)
        images = load_images(calib_paths, preprocess)[0] if given is None or opts.search else None
        val_images, _ = load_images(val_paths, preprocess)
        held = None if opts.max_drop is None or given is not None else \
            held_out(calib_all, calib_paths, opts.calib, preprocess)
    return Inputs(model, name, preprocess, images, val_images, method, bits, given, held, tuple(adapted))


def check_files(opts, inputs: list) -> None:
    """Outputs writable and never an input; --save-passes a folder that holds no input by its names."""
    if opts.output is not None:
        check_outputs(export_files(opts.output), inputs)
    folder = opts.save_passes
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise VitqError(f"--save-passes {folder} is a file, not a folder")
    for path in inputs:
        if path is not None and path.parent.resolve() == folder.resolve() \
                and re.fullmatch(r"\d\d_\w+\.onnx", path.name):
            raise VitqError(f"--save-passes {folder} would overwrite the input {path}")


def _given_recipe(opts, name: str) -> Recipe | None:
    """--recipe, checked against the model it is deployed on."""
    if opts.recipe is None:
        return None
    given = Recipe.load(opts.recipe)
    if given.model != name:
        raise VitqError(f"recipe {opts.recipe} is for {given.model}, not {name}")
    model_args = build_args(opts.img_size, opts.num_classes)
    if given.info.get("model_args", {}) != model_args:
        raise VitqError(f"recipe {opts.recipe} was calibrated for a model built with "
                        f"{build_args_text(given.info.get('model_args'))}, not {build_args_text(model_args)}")
    return given


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
