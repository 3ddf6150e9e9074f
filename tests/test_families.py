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
from vitq_onnx.calibration.simulation import simulate, torch_logits
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.errors import VitqError
from vitq_onnx.families import FAMILIES, short_names
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.models import prepare_model, resolve_name
from vitq_onnx.passes import PassContext, pipeline, run_passes

from .conftest import _tiny_vit

QUIET = CalibOptions(progress=False)


def _tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                           num_classes=10)


def _randomize(model, *names):
    """Parameters timm initializes to constants (zeros, init_values) drawn at random, so the test sees them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] in names:
                p.normal_(0, 0.5)
    return model


def _tiny_beit():
    from timm.models.beit import Beit

    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
                 use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=True, init_values=0.1)
    return _randomize(model, "q_bias", "v_bias", "relative_position_bias_table", "gamma_1", "gamma_2")


def _tiny_eva():
    """EVA-02 with rotary embedding, q/v biases beside the qkv Linear, inner attention norm; block 0 has
    EVA-02 B/L's SwiGLU (fc1_g and fc1_x read norm2, a norm before fc2), block 1 EVA-02 Ti/S's packed one."""
    from timm.layers import GluMlp
    from timm.models.eva import Eva

    model = Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=10)
    model.blocks[1].mlp = GluMlp(32, 2 * 85, act_layer=nn.SiLU, gate_last=False)
    return _randomize(model, "q_bias", "v_bias")


def _tiny_swin_v2():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    model = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                              num_heads=(1, 2), num_classes=10)
    with torch.no_grad():  # timm initializes these to constants: values that move the outputs
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
            elif name.endswith("logit_scale"):
                p.uniform_(1, 5)  # some above the clamp, log(100)
            elif name.endswith(("norm1.weight", "norm2.weight")):
                p.normal_(1, 0.5)  # timm's post-norms start at 0: every block the identity
    return model


def _tiny_tiny_vit():
    from timm.models.tiny_vit import TinyVit

    # 8x8 after the stem: an MBConv stage, then 4x4 (two 2x2 windows per side) and 2x2 (one window)
    model = TinyVit(num_classes=10, embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=(1, 1, 2),
                    window_sizes=(2, 2, 2), mlp_ratio=2.0, mbconv_expand_ratio=2.0, drop_path_rate=0.0)
    with torch.no_grad():  # timm initializes these to constants: values that move the outputs
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 2), mod.weight.uniform_(0.5, 2)
            elif hasattr(mod, "attention_biases"):
                mod.attention_biases.normal_(0, 1)
    return model


def _tiny_cait():
    """Two talking-heads blocks over 4 heads, one class-attention block; LayerScale at 1 (not
    timm's 1e-5), so that every branch moves the logits."""
    from timm.models.cait import Cait

    return Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, depth_token_only=1,
                init_values=1.0, num_classes=10)


def _tiny_siglip():
    """The tiny ViT's trunk without a class token, pooled by attention to a learned latent (SigLIP's 'map')."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             class_token=False, global_pool="map", num_classes=10)


def _tiny_pvt_v2():
    """Two stages of one block: spatial reduction (sr_ratio 2, an 8x8 grid) and none (4x4)."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1),
                                      mlp_ratios=(2, 2), num_classes=10)


# one tiny model per family: a family without one here fails test_every_family_has_a_tiny_model
TINY_MODELS = {"vit": _tiny_vit, "swin": _tiny_swin, "beit": _tiny_beit, "eva": _tiny_eva, "swin_v2": _tiny_swin_v2,
               "tiny_vit": _tiny_tiny_vit, "cait": _tiny_cait, "pvt_v2": _tiny_pvt_v2, "siglip": _tiny_siglip}


def test_every_family_has_a_tiny_model_and_short_names_that_timm_knows():
    assert set(TINY_MODELS) == set(FAMILIES) - {"hf"}  # Hugging Face towers: tests/test_hf.py
    for short, full in short_names().items():
        assert resolve_name(short) == full


@pytest.mark.parametrize("bits, fmt", [("8/8", "ort"), ("4/4", "qdq"), ("4/4", "ort")])
@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_family_exports_bit_exact(family, bits, fmt, tiny_images):
    torch.manual_seed(0)
    model = prepare_model(TINY_MODELS[family]())
    recipe = calibrate(model, tiny_images[:8], BitWidths.parse(bits), get_method("repq"), family,
                       CalibOptions(progress=False))
    attention = [k for k in recipe.activations if "/matmul_" in k]
    assert attention, "the family's attention is quantized"
    fp32 = export_fp32(model, 32)
    stored = {i.name for i in fp32.graph.initializer}
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    if any(FAMILIES[family].norm_linear_pairs(m) for m in model.modules()):  # (Swin V2's post-norm blocks: none)
        assert recipe.reparams, "RepQ-ViT's fold found the family's norm -> Linear pairs"
    onnx_model = run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    sim = torch_logits(simulate(model, recipe), tiny_images[8:])
    np.testing.assert_array_equal(runtime.run(runtime.session(onnx_model), tiny_images[8:]), sim)


class TokenMixer(nn.Module):
    """An attention by another name, which no family claims."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.einsum("bij,bjd->bid", (q @ k.transpose(-2, -1)).softmax(-1), v)


class ToyNet(nn.Module):
    """Patches, one TokenMixer, a head: 32-px images, 10 classes."""

    def __init__(self):
        super().__init__()
        self.patch, self.mixer, self.head = nn.Conv2d(3, 8, 8, 8), TokenMixer(), nn.Linear(8, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head((x + self.mixer(x)).mean(1))


def test_an_activation_matmul_no_family_claims_is_refused_before_calibration(tiny_images, monkeypatch):
    import vitq_onnx.calibration.calibrate as calibration

    monkeypatch.setattr(calibration, "_run_stages", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(VitqError, match=r"TokenMixer at 'mixer' multiplies two activations.*vit \(.*swin \(.*"
                                        r"--keep-float .mixer. keeps"):
        calibrate(ToyNet().eval(), tiny_images[:8], BitWidths(8, 8), get_method("basic"), "toy", QUIET)


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_kept_float_it_is_listed_and_the_graph_check_holds_the_recipe_to_it(tiny_images, fmt):
    torch.manual_seed(0)
    model = ToyNet().eval()
    recipe = calibrate(model, tiny_images[:8], BitWidths.parse("8/8", [], ["mixer"]), get_method("basic"), "toy",
                       QUIET)
    assert {"mixer", "mixer.qkv"} <= set(recipe.float_layers) and recipe.keep_float == ["mixer"]
    fp32 = export_fp32(model, 32)
    onnx_model = run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    floats = [n for n in onnx_model.graph.node if n.op_type in ("MatMul", "Einsum") and n.name.startswith("mixer/")]
    assert len(floats) == 2  # q @ k^T and the einsum, both float and both named by the recipe
    sim = torch_logits(simulate(model, recipe), tiny_images[8:])
    np.testing.assert_array_equal(runtime.run(runtime.session(onnx_model), tiny_images[8:]), sim)
    recipe.float_layers = [f for f in recipe.float_layers if f != "mixer"]
    with pytest.raises(VitqError, match=r"2 float matmuls of two activations .* 'mixer/"):
        run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)


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


class ConvStemNet(nn.Module):
    """A conv stem as XCiT's and TinyViT's: nested Sequentials of Conv2d + BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)), nn.GELU(),
                                  nn.Sequential(nn.Conv2d(8, 8, 4, 4), nn.BatchNorm2d(8)))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.stem(x).flatten(2).mean(2))


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_a_conv_stem_with_batchnorm_is_folded_and_exports_bit_exact(tiny_images, fmt):
    """Once: 'recipe does not fit the graph: no weight at stem.0.0/Conv:1' (the exporter folded
    the BatchNorm itself and the nested Sequential's scope became 'stem.0.stem.0.0')."""
    from vitq_onnx.models import fold_batch_norms

    torch.manual_seed(0)
    model = ConvStemNet().eval()
    for bn in (model.stem[0][1], model.stem[2][1]):  # statistics that move the outputs
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.from_numpy(tiny_images[:4])
    with torch.no_grad():
        before = model(x)
        assert fold_batch_norms(model) == 2
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # the same function, in FP
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    recipe = calibrate(model, tiny_images[:8], BitWidths(8, 8), get_method("basic"), "toy", QUIET)
    assert {"stem.0.0/Conv:1", "stem.2.0/Conv:1"} <= set(recipe.weights)
    onnx_model = run_passes(export_fp32(model, 32), pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    sim = torch_logits(simulate(model, recipe), tiny_images[8:])
    np.testing.assert_array_equal(runtime.run(runtime.session(onnx_model), tiny_images[8:]), sim)


def test_float_functions_inside_a_forward_are_simulated_with_onnxruntimes_kernels():
    """Pooled heads (Swin, PVT, TinyViT) average the tokens, EVA-02's SwiGLU takes a SiLU, CLIP's
    quick GELU a sigmoid, SigLIP a tanh GELU: torch's kernels round these differently from
    onnxruntime's, so the simulation's forward runs onnxruntime's (ReduceMean, GlobalAveragePool,
    Sigmoid, Gelu)."""
    from vitq_onnx import runtime_kernels
    from vitq_onnx.calibration.simulation import _RuntimeFunctions

    F = torch.nn.functional
    x = torch.randn(4, 7, 7, 320, generator=torch.Generator().manual_seed(0)) * 3
    nchw = x.permute(0, 3, 1, 2)
    with _RuntimeFunctions():
        got = [x.mean((1, 2)), F.adaptive_avg_pool2d(nchw, 1), torch.sigmoid(x), F.silu(x),
               F.gelu(x, approximate="tanh"), torch.nn.GELU()(x), F.normalize(x, dim=-1)]
    want = [runtime_kernels.reduce_mean(x, (1, 2)), runtime_kernels.global_average_pool(nchw),
            runtime_kernels.sigmoid(x), x * runtime_kernels.sigmoid(x), runtime_kernels.gelu(x, "tanh"),
            runtime_kernels.gelu(x), runtime_kernels.l2_normalize(x)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    torch_own = [x.mean((1, 2)), None, torch.sigmoid(x), F.silu(x), F.gelu(x, approximate="tanh"), F.gelu(x),
                 F.normalize(x, dim=-1)]
    assert sum(t is not None and not torch.equal(t, g) for t, g in zip(torch_own, got)) >= 3  # they do differ
