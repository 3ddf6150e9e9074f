"""Fast tier: how --time-budget plans an export (images, token rows, batch) on a tiny ViT."""

import copy
import json

import numpy as np
import pytest
import torch

from vitq_onnx import cli
from vitq_onnx.calibration import reconstruct
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.quant_points import instrument
from vitq_onnx.calibration.simulation import folded, simulated
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.families import block_rows
from vitq_onnx.orchestrator.recipe_source import MIN_IMAGES, PASSES_SHARE, planned_images
from vitq_onnx.recipe import Recipe


def test_a_blocks_rows_are_its_output_at_those_rows_float_and_quantized(tiny, tiny_images):
    """block_rows computes the queries and all that follows only at the chosen rows; keys and
    values see every token: the rows of the whole block's output, in float and in the simulation."""
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), get_method("repq"), "tiny", CalibOptions(progress=False))
    x = torch.randn(4, 17, 32, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 3, 4, 11, 16])
    for model in (folded(tiny, recipe)[0], simulated(tiny, recipe)[0]):
        with torch.no_grad():
            for block in model.blocks:
                torch.testing.assert_close(block_rows(block)(x, rows), block(x)[:, rows], rtol=1e-5, atol=1e-6)


def test_a_block_without_row_forward_has_none(tiny):
    """A family without ``block_rows`` (Swin's windows) and an uninstrumented block: None."""
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=32,
                             num_heads=(1, 1, 1, 1))
    instrument(swin)
    assert block_rows(swin.layers[0].blocks[0]) is None
    assert block_rows(copy.deepcopy(tiny).blocks[0]) is None  # not instrumented: no quant points to see


def test_the_plan_keeps_every_image_that_fits_and_fewer_where_passes_would_eat_the_budget():
    stages = get_method("repq-recon").stages
    passes = sum(s.image_passes for s in stages)
    said = []
    assert planned_images(stages, 125, 0.01, 600, said.append) == 125  # DeiT-Ti at 224 px: every image
    n = planned_images(stages, 125, 0.68, 840, said.append)  # a 518-px ViT-S, 15 minutes
    assert n == int(PASSES_SHARE * 840 / (passes * 0.68)) and MIN_IMAGES < n < 125
    assert f"{n} of 125 calibration images" in said[-1]
    assert planned_images(stages, 125, 5.0, 60, said.append) == MIN_IMAGES  # never fewer
    assert planned_images(get_method("repq").stages, 125, 5.0, 60, said.append) == MIN_IMAGES
    assert all(s.image_passes == 0 for s in get_method("basic").stages[:1])  # weights alone: no pass


def test_budget_reconstruction_trains_on_token_rows_and_stays_bit_exact(tiny_calib_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """Under --time-budget a ViT block with more than twice TRAIN_ROWS tokens trains on TRAIN_ROWS
    random rows of each image (here 4 of 17), the plan says so, and the export is bit-exact."""
    monkeypatch.setattr(reconstruct, "TRAIN_ROWS", 4)
    out = tmp_path / "m.onnx"
    code = cli.main(["export", "--model", "vitq_tiny_test", "--random-weights", "--bits", "4/4", "--method",
                     "repq-recon", "--calib", str(tiny_calib_dir), "--time-budget", "0.2", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["exact_images"] == 1.0
    assert "4 of 17 token rows per image" in captured.err
    info = Recipe.load(out.with_suffix(".recipe.json")).info["reconstruction"]
    assert info["budget_rows"] == 4 and min(info["iters"]) >= 1
    assert np.isfinite(info["loss_after"]).all()


@pytest.mark.parametrize("budget", [None, 0.2])
def test_without_a_budget_nothing_is_sampled(tiny_calib_dir, tmp_path, capsys, budget, monkeypatch):
    """No --time-budget: every token and the method's batch (the bytes of before); with one, the
    rows only where a block has more than twice TRAIN_ROWS tokens (17 here: none)."""
    out = tmp_path / "m.onnx"
    extra = [] if budget is None else ["--time-budget", str(budget)]
    code = cli.main(["export", "--model", "vitq_tiny_test", "--random-weights", "--bits", "4/4", "--method",
                     "repq-recon", "--calib", str(tiny_calib_dir), "-o", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    info = Recipe.load(out.with_suffix(".recipe.json")).info["reconstruction"]
    assert ("budget_rows" in info) == (budget is not None) and info.get("budget_rows") is None
