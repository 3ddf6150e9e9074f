"""End to end through the CLI: real DeiT-Ti at 8/8, Swin-T graph with random weights, eval."""

import json

import onnx
import onnxruntime as ort
import pytest

from vitq_onnx.cli import main

from .conftest import CALIB, DEIT_WEIGHTS, VAL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deit_w8a8(tmp_path_factory, deit):
    out = tmp_path_factory.mktemp("export") / "deit_t_w8a8.onnx"
    args = ["export", "--model", "deit_t", "--bits", "8/8", "--weights", str(DEIT_WEIGHTS),
            "--calib", str(CALIB), "--num-calib", "8", "-q", "-o", str(out)]
    assert main(args) == 0
    return out


def test_export_writes_model_recipe_and_metadata(deit_w8a8):
    assert sorted(p.name for p in deit_w8a8.parent.iterdir()) == [
        "deit_t_w8a8.onnx", "deit_t_w8a8.recipe.json", "deit_t_w8a8.recipe.npz"]
    model = onnx.load(deit_w8a8)
    onnx.checker.check_model(model)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["vitq.recipe"]["bits"] == {"w": 8, "a": 8, "layers": []}
    assert set(meta["vitq.recipe"]["tensor_bits"].values()) == {8}  # every tensor, the 8-bit image input too
    assert meta["vitq.validation"]["top1_agreement"] >= 0.99
    assert meta["vitq.preprocess"]["size"] == 224
    recipe = json.loads(deit_w8a8.with_name("deit_t_w8a8.recipe.json").read_text())
    assert recipe["activations"]["blocks.3.attn.qkv/MatMul:0"]["bits"] == 8
    assert recipe["activations"]["patch_embed.proj/Conv:0"]["bits"] == 8
    # every Linear and the patch-embedding weight is stored as integers (8-bit: uint8, zero point
    # 128, for onnxruntime's exact u8*u8 kernels), pos_embed as int8 codes
    dtypes = [i.data_type for i in model.graph.initializer if len(i.dims) >= 2]
    assert dtypes.count(onnx.TensorProto.UINT8) == 4 * 12 + 1 + 1 and onnx.TensorProto.FLOAT not in dtypes
    assert dtypes.count(onnx.TensorProto.INT8) == 1


def test_eval_reports_accuracy_and_agreement(deit_w8a8, tmp_path, capsys):
    images = tmp_path / "val"
    images.mkdir()
    for p in sorted(VAL.iterdir())[:16]:
        (images / p.name).symlink_to(p)
    result = tmp_path / "r.json"
    assert main(["eval", str(deit_w8a8), "--images", str(images), "--compare", str(deit_w8a8),
                 "--json", str(result), "-q"]) == 0
    r = json.loads(result.read_text())
    assert r["images"] == 16 and r["top1_agreement"] == 1.0 and r["top1"] >= 0.6
    assert "top-1" in capsys.readouterr().out


def test_swin_random_weights_exports_and_runs(tmp_path):
    out = tmp_path / "swin_t.onnx"
    assert main(["export", "--model", "swin_t", "--random-weights", "--bits", "8/8", "--calib", str(CALIB),
                 "--num-calib", "4", "-q", "-o", str(out)]) == 0
    model = onnx.load(out)
    names = {n.name for n in model.graph.node}
    assert "layers.1.downsample.reduction/input_q" in names and "layers.0.blocks.1.attn/q_q" in names
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].name == "image"


@pytest.mark.parametrize("bits", ["8/8", "4/4"])
def test_headless_dinov2_backbone_exports_bit_exact_features(tmp_path, bits):
    """A DINOv2 ViT-S (headless by default) built at 112 px: features validated by cosine."""
    out = tmp_path / "dino.onnx"
    assert main(["export", "--model", "vit_small_patch14_dinov2", "--random-weights", "--img-size", "112",
                 "--bits", bits, "--method", "repq", "--calib", str(CALIB), "--num-calib", "8", "--validate-images", "16", "-q",
                 "-o", str(out)]) == 0
    report = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}["vitq.validation"]
    assert report["images"] == 16 and report["exact_images"] >= 0.99 and "top1_agreement" not in report
    assert 0 < report["fp_cosine_mean"] <= 1.0 + 1e-9
