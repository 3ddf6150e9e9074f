"""Fast tier: every registered model family, as a tiny random model, exports bit-exact at 8/8
(ort) and 4/4 (ort and qdq); what no family claims is refused before any calibration."""

import numpy as np
import pytest
import torch
from torch import nn

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.quant_points import instrument
from vitq_onnx.calibration.simulation import simulate, torch_logits
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.errors import VitqError
from vitq_onnx.families import FAMILIES, short_names
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.models import resolve_name
from vitq_onnx.passes import PassContext, pipeline, run_passes

from .conftest import _tiny_vit


def _tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                           num_classes=10)


# one tiny model per family: a family without one here fails test_every_family_has_a_tiny_model
TINY_MODELS = {"vit": _tiny_vit, "swin": _tiny_swin}


def test_every_family_has_a_tiny_model_and_short_names_that_timm_knows():
    assert set(TINY_MODELS) == set(FAMILIES)
    for short, full in short_names().items():
        assert resolve_name(short) == full


@pytest.mark.parametrize("bits, fmt", [("8/8", "ort"), ("4/4", "qdq"), ("4/4", "ort")])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_bit_exact(family, bits, fmt, tiny_images):
    torch.manual_seed(0)
    model = TINY_MODELS[family]().eval()
    recipe = calibrate(model, tiny_images[:8], BitWidths.parse(bits), get_method("repq"), family,
                       CalibOptions(progress=False))
    attention = [k for k in recipe.activations if "/matmul_" in k]
    assert attention, "the family's attention is quantized"
    fp32 = export_fp32(model, 32)
    stored = {i.name for i in fp32.graph.initializer}
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    assert recipe.reparams, "RepQ-ViT's fold found the family's norm -> Linear pairs"
    onnx_model = run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    sim = torch_logits(simulate(model, recipe), tiny_images[8:])
    np.testing.assert_array_equal(runtime.run(runtime.session(onnx_model), tiny_images[8:]), sim)


class MyAttention(nn.Module):
    """An attention no family claims."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_an_attention_no_family_claims_is_refused_naming_the_families():
    model = nn.Sequential(nn.Linear(8, 8), MyAttention())
    with pytest.raises(VitqError, match=r"unsupported attention module MyAttention at 1: .*vit \(.*swin \("):
        instrument(model)


def test_a_checkpoint_saved_at_another_size_gets_its_position_embedding_resampled(tmp_path, tiny_calib_dir, capsys):
    """The tiny ViT's 32-px weights (4x4 patches) built at 48 px (6x6): timm's resampling, said in
    the printout, the recipe and the metadata; the export stays bit-exact."""
    import json

    import onnx
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    from vitq_onnx.cli import main
    from vitq_onnx.recipe import Recipe

    from .conftest import TINY

    torch.manual_seed(0)
    small = _tiny_vit()
    weights = tmp_path / "tiny32.safetensors"
    save_file(small.state_dict(), str(weights))
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", TINY, "--weights", str(weights), "--img-size", "48", "--calib",
                 str(tiny_calib_dir), "--num-calib", "8", "-o", str(out)]) == 0
    assert "pos_embed resampled from (1, 17, 32) to (1, 37, 32)" in capsys.readouterr().err
    recipe = Recipe.load(out.with_name("m.recipe.json"))
    assert recipe.info["checkpoint_adapted"] == ["pos_embed resampled from (1, 17, 32) to (1, 37, 32) (bicubic, "
                                                 "for a 48-px input)"]
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert meta["vitq.recipe"]["checkpoint_adapted"] == recipe.info["checkpoint_adapted"]
    assert meta["vitq.validation"]["exact_images"] == 1.0
    from vitq_onnx.models import build_model

    model, notes = build_model(TINY, weights, img_size=48)
    expected = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert notes and torch.equal(model.pos_embed.detach(), expected)


def test_a_checkpoint_of_another_width_is_still_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from vitq_onnx.models import build_model

    from .conftest import TINY

    wide = _tiny_vit()
    state = {k: torch.cat([v, v], -1) if k == "pos_embed" else v for k, v in wide.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(VitqError, match="mis-shaped keys"):
        build_model(TINY, tmp_path / "w.safetensors", img_size=48)
