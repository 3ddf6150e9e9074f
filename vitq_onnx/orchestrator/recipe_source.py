"""The recipe to deploy: calibrated with the method (and a search), an earlier one refined by a
search, or an earlier one as it is (``--recipe``)."""

from __future__ import annotations

from ..calibration.bits import BitWidths
from ..calibration.calibrate import calibrate, refine
from ..calibration.methods import Method, search_stage
from ..calibration.state import CalibOptions
from ..models import build_args
from ..progress import StageTimes
from ..recipe import Recipe
from .inputs import Inputs


def make_recipe(inputs: Inputs, bits: BitWidths, mixed: dict | None, opts, times: StageTimes, say) -> Recipe:
    method, given = inputs.method, inputs.given
    options = CalibOptions(opts.seed, opts.device, None if opts.time_budget is None else 60 * opts.time_budget,
                           opts.progress, times)
    search = () if opts.search is None else (search_stage(opts.search, opts.search_budget, opts.search_fitness),)
    if given is None:
        at = "the mixed-precision map" if bits.rules and not opts.layer_bits else f"W{bits.w}/A{bits.a}"
        say(f"calibrating {inputs.name} at {at} ({method.name}{' + ' + opts.search if search else ''}) "
            f"on {len(inputs.images)} images")
        recipe = calibrate(inputs.model, inputs.images, bits, Method(method.name, method.description,
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
