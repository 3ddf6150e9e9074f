"""The recipe to deploy: calibrated with the method (and a search), an earlier one refined by a
search, or an earlier one as it is (``--recipe``)."""

from __future__ import annotations

import time

import torch

from ..calibration.bits import BitWidths
from ..calibration.calibrate import calibrate, refine
from ..calibration.methods import Method, auto_table, search_stage
from ..calibration.state import CalibOptions
from ..models import build_args
from ..progress import StageTimes
from ..recipe import Recipe
from .inputs import Inputs, narrowest


def make_recipe(inputs: Inputs, bits: BitWidths, mixed: dict | None, opts, times: StageTimes, say,
                started: float) -> Recipe:
    method, given = inputs.method, inputs.given
    search = () if opts.search is None else (search_stage(opts.search, opts.search_budget, opts.search_fitness),)
    images, deadline = inputs.images, None
    if given is None or opts.time_budget is not None:
        image_s = forward_seconds(inputs)
    if opts.time_budget is not None:
        deadline = calibration_deadline(inputs, opts, started, image_s, say)
        if given is None:
            images = images[:planned_images(method.stages, len(images), image_s, deadline - time.time(), say)]
    options = CalibOptions(opts.seed, opts.device, deadline, opts.progress, times)
    if given is None:
        at = "the mixed-precision map" if bits.rules and not opts.layer_bits else f"W{bits.w}/A{bits.a}"
        if opts.method == "auto":
            say(f"method auto: {method.name} for {narrowest(opts, bits)}-bit layers ({auto_table()}; docs/methods.md)")
        expected = expected_seconds(method.stages, len(images), image_s)
        say(f"calibrating {inputs.name} at {at} ({method.name}{' + ' + opts.search if search else ''}) "
            f"on {len(images)} images: expected about {_minutes(expected)}"
            + ("" if deadline is None or expected <= deadline - time.time()
               else f", held to the budget's {_minutes(deadline - time.time())}"))
        recipe = calibrate(inputs.model, images, bits, Method(method.name, method.description,
                                                              method.stages + search), inputs.name, options)
        model_args = build_args(opts.img_size, opts.num_classes)
        if model_args:
            recipe.info["model_args"] = model_args
        if inputs.adapted:
            recipe.info["checkpoint_adapted"] = list(inputs.adapted)
        if mixed is not None:
            recipe.info["mixed_precision"] = mixed
    elif search:
        say(f"refining the {given.method} recipe {opts.recipe} with the {opts.search} search on "
            f"{len(inputs.images)} images")
        recipe = refine(inputs.model, given, inputs.images, search, options)
    else:
        say(f"deploying the {given.method} recipe {opts.recipe} (no calibration)")
        recipe = given
    recipe.info["format"] = opts.format
    return recipe


def forward_seconds(inputs: Inputs) -> float:
    """Seconds per image of the float model's forward, timed on the validation images: the unit
    of every time the export plans (it grows as blocks x width x tokens x (width + tokens))."""
    t = time.time()
    with torch.no_grad():
        inputs.model(torch.from_numpy(inputs.val_images))
    return (time.time() - t) / len(inputs.val_images)


def calibration_deadline(inputs: Inputs, opts, started: float, image_s: float, say) -> float:
    """When calibration must end for the whole export to fit --time-budget (counted from the
    export's start): the budget, less the time the graph and its validation will take after it,
    estimated from a float forward of the validation images (8 of them, plus 10 s: the passes,
    the simulation and onnxruntime on those images; 28 s of a 518-px ViT-S's export, 4 s of
    DeiT-Ti's)."""
    after = 10.0 + 8 * image_s * len(inputs.val_images)
    deadline = started + 60 * opts.time_budget - after
    say(f"time budget {opts.time_budget:g} min: calibration has {(deadline - time.time()) / 60:.1f} min, "
        f"about {after:.0f} s kept for the graph and its validation")
    return deadline


def expected_seconds(stages, images: int, image_s: float) -> float:
    """Calibration's seconds as its stages estimate them (``Stage.expected_forwards``: float
    forwards of one image, ``image_s`` each)."""
    return image_s * sum(getattr(stage, "expected_forwards", lambda n: 0.0)(images) for stage in stages)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# under --time-budget, the share of calibration's time its passes over the images may take (the
# rest trains), and the fewest images it keeps
PASSES_SHARE = 0.4
MIN_IMAGES = 16


def planned_images(stages, available: int, image_s: float, seconds: float, say) -> int:
    """How many calibration images fit ``seconds``: their passes (each stage's ``image_passes``
    float forwards of ``image_s`` seconds an image) take at most PASSES_SHARE of it, so that
    training keeps the rest; all of them where they fit (DeiT-Ti at 224 px), at least MIN_IMAGES."""
    passes = sum(getattr(stage, "image_passes", 0.0) for stage in stages)
    if passes == 0 or available <= MIN_IMAGES:
        return available
    n = max(MIN_IMAGES, min(available, int(PASSES_SHARE * seconds / (passes * image_s))))
    say(f"  plan: {n} of {available} calibration images, their passes about {n * passes * image_s / 60:.1f} min "
        f"({passes:g} float forwards of each image, {image_s:.2f} s each)"
        + ("" if n == available else f"; the rest of the {seconds / 60:.1f} min trains"))
    return n
