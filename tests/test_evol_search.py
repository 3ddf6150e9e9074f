"""Evol-Q's search: a refinement that never worsens what it scores, stays bit-exact, and can refine a recipe."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate, refine
from vitq_onnx.calibration import evol_search
from vitq_onnx.calibration.evol_search import EvolSearch, info_nce, significantly_lower
from vitq_onnx.calibration.methods import Method, get_method
from vitq_onnx.calibration.stages import Stage
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.cli import main
from vitq_onnx.errors import VitqError
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.recipe import Recipe
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import compare_logits, torch_logits

from .conftest import TINY

QUIET = CalibOptions(progress=False)
SMALL = EvolSearch(passes=2, population=4, cycles=4, sample=2, mutation=0.1, held_out=4)


class _Logits(Stage):
    """Records what the state's model computes on the calibration images."""

    name = "logits"

    def __init__(self):
        self.seen = None

    def run(self, state):
        with torch.no_grad():
            self.seen = state.model(state.images)


def _with(method: str, *stages) -> Method:
    m = get_method(method)
    return Method(m.name, m.description, m.stages + stages)


@pytest.mark.parametrize("method", ["repq", "repq-recon", "ias"])
def test_a_recipe_rebuilds_the_model_its_calibration_left(tiny, tiny_images, method):
    after = _Logits()
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _with(method, after), "tiny", QUIET)
    rebuilt = _Logits()
    refine(tiny, recipe, tiny_images, (rebuilt,), QUIET)
    torch.testing.assert_close(rebuilt.seen, after.seen, rtol=0, atol=1e-5)


def test_info_nce_is_lowest_when_each_output_matches_its_own_image():
    k = torch.randn(8, 10)
    assert info_nce(k, k) < info_nce(k.roll(1, 0), k)


def test_a_block_is_kept_only_for_a_fall_beyond_the_noise():
    old = torch.linspace(0.1, 1.0, 24)
    assert significantly_lower(old * 0.9, old)  # every image better
    noise = torch.tensor([0.05, -0.06] * 12)
    assert not significantly_lower(old + noise - 0.001, old)  # a mean fall far inside the spread
    assert not significantly_lower(old * 1.1, old)


def test_search_never_worsens_its_fitness_or_the_held_out_kl(tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _with("repq", SMALL), "tiny", QUIET)
    info = recipe.info["search"]
    assert info["fitness_after"] <= info["fitness_before"]
    assert info["held_out_kl_after"] <= info["held_out_kl_before"]
    assert info["evaluations"] == 2 * 2 * 8 or info["stopped"] == "held-out KL"
    assert info["images"] == 12 and info["held_out"] == 4


def test_search_changes_scales_and_stays_bit_exact(tiny, tiny_images, tiny_fp32_onnx, monkeypatch):
    monkeypatch.setattr(evol_search, "SIGNIFICANCE", 0.0)  # keep any fall: 2 held-out images are all noise
    base = calibrate(tiny, tiny_images, BitWidths(4, 4), get_method("repq"), "tiny", QUIET)
    searched = refine(tiny, base, tiny_images, (dataclasses.replace(SMALL, held_out=2, passes=1),), QUIET)
    moved = [k for k in base.weights if not np.array_equal(base.weights[k].scale, searched.weights[k].scale)]
    moved += [k for k in base.activations if base.activations[k].params != searched.activations[k].params]
    assert moved, "the search kept every scale"
    assert all(k.startswith("blocks.") for k in moved)  # the blocks' scales, nothing outside them
    for fmt in ("ort", "qdq"):
        model = run_passes(tiny_fp32_onnx, pipeline(searched, fmt), PassContext(searched, fmt), progress=False)
        report = compare_logits(torch_logits(simulate(tiny, searched), tiny_images),
                                runtime.run(runtime.session(model), tiny_images))
        assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0


def test_search_is_deterministic_for_a_seed(tiny, tiny_images, monkeypatch):
    monkeypatch.setattr(evol_search, "SIGNIFICANCE", 0.0)
    base = calibrate(tiny, tiny_images, BitWidths(4, 4), get_method("repq"), "tiny", QUIET)
    stage = (dataclasses.replace(SMALL, held_out=2, passes=1),)
    runs = [refine(tiny, base, tiny_images, stage, CalibOptions(seed=s, progress=False)) for s in (5, 5, 6)]
    assert runs[0].info["search"] == runs[1].info["search"]
    assert runs[0].info["search"]["passes"] != runs[2].info["search"]["passes"]


def test_search_budget_stops_it_and_says_so(tiny, tiny_images):
    stage = dataclasses.replace(SMALL, passes=50, budget=0.5)
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _with("repq", stage), "tiny", QUIET)
    assert recipe.info["search"]["stopped"] in ("budget", "held-out KL")
    assert len(recipe.info["search"]["passes"]) < 50


def test_the_exports_time_budget_stops_the_search_too(tiny, tiny_images):
    """--time-budget's deadline (past here) ends the search however large its own budget."""
    import time

    base = calibrate(tiny, tiny_images, BitWidths(4, 4), get_method("repq"), "tiny", QUIET)
    stage = (dataclasses.replace(SMALL, passes=50, budget=3600.0),)
    recipe = refine(tiny, base, tiny_images, stage, CalibOptions(deadline=time.time() - 1, progress=False))
    assert recipe.info["search"]["stopped"] == "budget" and len(recipe.info["search"]["passes"]) <= 1


def test_search_without_enough_images_is_a_clear_error(tiny, tiny_images):
    with pytest.raises(VitqError, match="raise --num-calib"):
        calibrate(tiny, tiny_images[:7], BitWidths(4, 4), _with("repq", SMALL), "tiny", QUIET)


def _export(tmp_path, calib, name, *extra):
    out = tmp_path / name
    code = main(["export", "--model", TINY, "--random-weights", "--calib", str(calib), "-q", "-o", str(out), *extra])
    return code, out


def test_cli_search_after_a_method_and_on_an_earlier_recipe(tmp_path, tiny_calib_dir):
    code, out = _export(tmp_path, tiny_calib_dir, "searched.onnx", "--bits", "4/4", "--method", "repq", "--search", "evol",
                        "--search-fitness", "mse")
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert meta["vitq.recipe"]["search"]["fitness"] == "mse" and meta["vitq.validation"]["top1_agreement"] == 1.0
    assert Recipe.load(out.with_name("searched.recipe.json")).info["search"]["images"] == 6  # all 8, 2 held out
    code, base = _export(tmp_path, tiny_calib_dir, "base.onnx", "--bits", "4/4", "--method", "repq")
    code, refined = _export(tmp_path, tiny_calib_dir, "refined.onnx", "--recipe", str(base.with_name("base.recipe.json")),
                            "--search", "evol")
    recipe = Recipe.load(refined.with_name("refined.recipe.json"))
    assert code == 0 and recipe.method == "repq" and recipe.info["search"]["kind"] == "evol"


@pytest.mark.parametrize("extra, match", [
    (["--search-budget", "2"], "add --search evol"),
    (["--search", "evol", "--search-budget", "0"], "--search-budget must be"),
    (["--search", "evol", "--num-calib", "7"], "raise --num-calib"),
])
def test_cli_bad_search_options_are_one_line_errors(tmp_path, tiny_calib_dir, capsys, extra, match):
    code, out = _export(tmp_path, tiny_calib_dir, "tiny.onnx", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1]
    assert not out.exists()
