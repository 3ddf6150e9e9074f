"""MPTQ-ViT's SQ-b and OPT-m on a tiny ViT (fast tier): the fold is lossless, alpha comes from the
grid, OPT-m lowers fc2's output error, and the export is bit-exact in both formats."""

import torch
import pytest

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import REPQ_SOFTMAX, get_method
from vitq_onnx.calibration.quantizers.uniform import fake_uniform, fit_uniform_rows
from vitq_onnx.calibration.smooth_bias import SQB_ALPHAS, SmoothBias
from vitq_onnx.calibration.stages import FitActivations, FitWeights
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import torch_logits

from .test_stages import _state

QUIET = CalibOptions(progress=False)


def test_smooth_bias_alone_is_lossless_and_picks_alpha_from_the_grid(tiny, tiny_images):
    state = _state(tiny, tiny_images)
    SmoothBias().run(state)
    assert len(state.recipe.reparams) == 4  # norm1 -> qkv, norm2 -> fc1 in 2 blocks
    assert set(state.recipe.info["sqb_alpha"].values()) <= set(SQB_ALPHAS)
    rep = state.recipe.reparams[0]
    assert (rep.r1 > 0).all() and not (rep.r1 == 1).all() and (rep.shift != 0).any()
    with torch.no_grad():
        x = torch.from_numpy(tiny_images)
        assert (state.model(x) - tiny(x)).abs().max() < 1e-4  # the fold changes no output


def test_opt_m_range_lowers_the_output_error_it_is_scored_by():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(512, 64, generator=gen) * 2)  # a long positive tail
    w = torch.randn(16, 64, generator=gen)
    errors = {}
    for name, weight in (("input", None), ("output", w)):
        scale, zp = fit_uniform_rows(x, 4, weight)
        errors[name] = float(((fake_uniform(x, scale, zp, 4) - x) @ w.t()).pow(2).mean())
    assert errors["output"] <= errors["input"]


def test_fit_activations_with_opt_m_changes_the_first_fc2_input_and_nothing_before(tiny, tiny_images):
    plain, optm = _state(tiny, tiny_images), _state(tiny, tiny_images)
    for state, opt_m in ((plain, False), (optm, True)):
        FitWeights().run(state)
        FitActivations(REPQ_SOFTMAX, opt_m=opt_m).run(state)
    upstream = ["patch_embed.proj/Conv:0", "blocks.0.attn.qkv/MatMul:0", "blocks.0.attn/matmul_qk:0",
                "blocks.0.attn/matmul_qk:1", "blocks.0.attn/matmul_av:0", "blocks.0.attn/matmul_av:1",
                "blocks.0.attn.proj/MatMul:0", "blocks.0.mlp.fc1/MatMul:0"]
    for key in upstream:  # fitted before the first fc2: the same
        assert plain.recipe.activations[key].params == optm.recipe.activations[key].params, key
    fc2 = "blocks.0.mlp.fc2/MatMul:0"
    assert plain.recipe.activations[fc2].params["scale"] != optm.recipe.activations[fc2].params["scale"]


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_mptq_export_is_bit_exact(tiny, tiny_images, tiny_fp32_onnx, fmt):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), get_method("mptq"), "tiny", QUIET)
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    sim = torch_logits(simulate(tiny, recipe), tiny_images)
    assert (sim == runtime.run(runtime.session(model), tiny_images)).all()


@pytest.mark.slow
def test_smooth_bias_fold_is_lossless_on_deit(deit, calib_images, val_images):
    from vitq_onnx.calibration.simulation import folded

    recipe = calibrate(deit, calib_images, BitWidths(4, 4), get_method("mptq-sqb"), "deit_tiny_patch16_224", QUIET)
    model, _ = folded(deit, recipe)  # the FP model with SQ-b folded in: the same function
    x = torch.from_numpy(val_images)
    with torch.no_grad():
        assert (model(x) - deit(x)).abs().max() <= 1e-3
