"""Fast tier: what keeps export cost bounded at high resolution computes what the plain code does:
float32 integer GEMMs stay exact, attention in batch slices changes no simulated bit, bounded
fits see whole probability rows, and the export's --validate-images / --img-size options."""

import json

import numpy as np
import onnx
import pytest
import torch

from vitq_onnx import runtime
from vitq_onnx.calibration import quant_points
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.quantizers import exact_sum_matmul, integer_matmul
from vitq_onnx.calibration.quantizers import log2 as L
from vitq_onnx.calibration.quantizers.search import SCORE_ROWS, attention_sample
from vitq_onnx.calibration.quantizers.uniform import fake_uniform
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.cli import main
from vitq_onnx.naming import attention_nodes, linear_node
from vitq_onnx.recipe import tensor_key
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import torch_logits

from .conftest import TINY

QUIET = CalibOptions(progress=False)


def test_float32_integer_gemm_is_exact_where_float32_alone_is_not():
    k = 3000  # 8-bit activations times 8-bit weights over 3000 inputs: sums far beyond 2^24
    a = torch.full((4, k), 255.0)
    a[1] = torch.randint(-255, 256, (k,)).float()
    b = torch.full((k, 3), 127.0)
    b[:, 1] = torch.randint(-128, 128, (k,)).float()
    exact = (a.double() @ b.double()).float()
    assert not torch.equal(a @ b, exact)  # a plain float32 GEMM rounds these sums
    assert torch.equal(exact_sum_matmul(a, b), exact)


@pytest.mark.parametrize("scale", [1.0, 2.0**13])  # small codes: one GEMM; products beyond float32: float64
def test_exact_sum_matmul_on_every_magnitude(scale):
    a = torch.randint(-15, 16, (2, 3, 50, 70)).float() * scale
    b = torch.randint(-8, 8, (2, 3, 70, 20)).float() * scale
    assert torch.equal(exact_sum_matmul(a, b), (a.double() @ b.double()).float())


def test_integer_matmul_rescales_the_exact_sum():
    a, b = torch.randint(0, 256, (5, 600)).float() * 0.02, torch.randint(-128, 128, (600, 7)).float() * 0.5
    ref = (torch.round(a / 0.02).double() @ torch.round(b / 0.5).double()).float() * (0.02 * 0.5)
    assert torch.equal(integer_matmul(a, b, torch.tensor(0.02), torch.tensor(0.5)), ref)


def test_log2_fake_by_table_is_the_dequantized_codes():
    x = torch.rand(3, 2, 40, 40).softmax(-1)
    x[0, 0, 0, :5] = 0.0  # exact zeros take the zero code
    for bits in (3, 4):
        scale = x.max() * 0.7
        assert torch.equal(L.fake_log2(x, scale, bits), L.log2_dequant(L.log2_codes(x, scale, bits), scale, bits))


def test_in_place_uniform_fake_equals_the_differentiable_one():
    x = torch.randn(64, 33) * 3
    scale, zp = torch.tensor(0.037), torch.tensor(7.0)
    y = fake_uniform(x.clone().requires_grad_(), scale, zp, 4)
    assert y.requires_grad and torch.equal(fake_uniform(x, scale, zp, 4), y.detach())


def test_attention_sample_keeps_whole_rows_of_few_images():
    x = torch.rand(6, 2, 600, 600).softmax(-1)
    v = torch.randn(6, 2, 600, 8)
    xs, vs = attention_sample(x, v)
    assert xs.shape == (4, 2, SCORE_ROWS, 600) and vs.shape == (4, 2, 600, 8)
    torch.testing.assert_close(xs.sum(-1), torch.ones(4, 2, SCORE_ROWS))  # every sampled row a distribution
    small = torch.rand(2, 2, 50, 50)
    assert torch.equal(attention_sample(small, None)[0], small)  # short maps: all of them


def test_attention_in_slices_changes_no_simulated_bit(tiny, tiny_images, monkeypatch):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), get_method("repq"), "tiny", QUIET)
    whole = torch_logits(simulate(tiny, recipe), tiny_images)
    per_map = 2 * 17 * 17  # tiny: 2 heads, 17 tokens
    monkeypatch.setattr(quant_points, "ATTENTION_CHUNK", 3 * per_map)  # slices of 3 images
    assert np.array_equal(torch_logits(simulate(tiny, recipe), tiny_images), whole)


def test_sliced_calibration_fits_q_k_v_on_every_image(tiny, tiny_images, monkeypatch):
    method = get_method("repq")
    whole = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), method, "tiny", QUIET)
    monkeypatch.setattr(quant_points, "ATTENTION_CHUNK", 2 * 2 * 17 * 17)  # slices of 2 images
    sliced = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), method, "tiny", QUIET)
    qk, av = attention_nodes("blocks.0.attn")
    for key in (tensor_key(linear_node("blocks.0.attn.qkv"), 0), tensor_key(qk, 0), tensor_key(qk, 1),
                tensor_key(av, 1)):  # the qkv input, q, k and v: the same fits from every image
        a, b = whole.activations[key].params, sliced.activations[key].params
        assert all(np.array_equal(a[n], b[n]) for n in a), key
    assert tensor_key(av, 0) in sliced.activations  # the map's own: fitted on the first slice


def _export(tmp_path, calib, *extra):
    out = tmp_path / "m.onnx"
    return main(["export", "--model", TINY, "--random-weights", "--calib", str(calib), "-q", "-o", str(out),
                 *extra]), out


def test_validate_images_sets_how_many_images_are_checked(tmp_path, tiny_calib_dir, capsys):
    code, out = _export(tmp_path, tiny_calib_dir, "--validate-images", "3")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["images"] == 3 and report["top1_agreement"] == 1.0
    assert "calibration 3/3: fit_activations" in report["stage_seconds"] and report["stage_peak_mb"]["validation"] > 0
    before = out.read_bytes()
    code, _ = _export(tmp_path, tiny_calib_dir, "--validate-images", "0")
    assert code == 1 and "--validate-images must be at least 1" in capsys.readouterr().err
    assert out.read_bytes() == before  # refused before any work: the earlier export untouched


def test_img_size_builds_the_model_at_that_resolution(tmp_path, tiny_calib_dir, capsys):
    code, out = _export(tmp_path, tiny_calib_dir, "--img-size", "48", "--bits", "4/4", "--method", "repq")
    assert code == 0
    model = onnx.load(out)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 48, 48]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["vitq.preprocess"]["size"] == 48 and meta["vitq.validation"]["top1_agreement"] == 1.0
    recipe = out.with_name("m.recipe.json")
    code = main(["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "-q",
                    "--recipe", str(recipe), "-o", str(tmp_path / "again.onnx")])
    assert code == 1 and "--img-size 48" in capsys.readouterr().err.strip().splitlines()[-1]


def test_swin_attention_in_slices_of_whole_images_changes_no_simulated_bit(tiny_images, monkeypatch):
    """Shifted windows add a per-window mask: a slice must hold whole images' windows."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2), num_classes=10).eval()
    recipe = calibrate(swin, tiny_images[:8], BitWidths(4, 4), get_method("repq"), "swin", QUIET)
    whole = torch_logits(simulate(swin, recipe), tiny_images)
    monkeypatch.setattr(quant_points, "ATTENTION_CHUNK", 1)  # one image's windows per slice
    assert np.array_equal(torch_logits(simulate(swin, recipe), tiny_images), whole)


@pytest.mark.parametrize("bits", ["8/8", "4/4"])
def test_headless_export_is_validated_by_feature_similarity(tmp_path, tiny_calib_dir, bits):
    code, out = _export(tmp_path, tiny_calib_dir, "--num-classes", "0", "--bits", bits, "--method", "repq")
    assert code == 0
    model = onnx.load(out)
    features = runtime.run(runtime.session(model), np.zeros((2, 3, 32, 32), np.float32))
    assert features.shape == (2, 32)  # the embedding, no classifier
    report = {p.key: json.loads(p.value) for p in model.metadata_props}["vitq.validation"]
    assert "top1_agreement" not in report and report["exact_images"] == 1.0
    assert report["sim_cosine_min"] == pytest.approx(1.0, abs=1e-12) and report["sim_max_abs_error"] == 0.0
    assert 0.5 < report["fp_cosine_min"] <= report["fp_cosine_mean"] <= 1.0 + 1e-9


def test_headless_drops_a_checkpoints_classifier(tmp_path, tiny):
    from safetensors.torch import save_file

    from vitq_onnx.models import create_model

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(weights))
    features = create_model(TINY, weights, num_classes=0)
    assert features.num_classes == 0 and torch.equal(features.blocks[0].attn.qkv.weight, tiny.blocks[0].attn.qkv.weight)
    with pytest.raises(Exception, match="--num-classes must be 0"):
        create_model(TINY, weights, num_classes=-1)
