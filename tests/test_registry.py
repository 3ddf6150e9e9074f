"""Fast tier: quantizer kinds, the one dispatch place, recipe versions, methods and bit maps."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vitq_onnx
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.methods import METHODS, get_method
from vitq_onnx.calibration.quantizers import KINDS, get_kind
from vitq_onnx.calibration.quant_points import QuantPoint
from vitq_onnx.errors import VitqError
from vitq_onnx.recipe import ActQuant, Recipe, WeightQuant


def _softmax_like(n=4096):
    x = torch.randn(8, n // 8).mul(3).softmax(-1)
    x[:, :5] = 0.0  # masked attention (Swin's shifted windows) gives exact zeros
    return x


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_every_kind_fits_fakes_and_trains(name, bits):
    kind = get_kind(name)
    x = _softmax_like()
    params = kind.fit(x, bits, QuantPoint("m/MatMul:0", "softmax"))
    assert sorted(params) == sorted(kind.params)
    exact = kind.fake(x, params, bits)
    assert exact.shape == x.shape and torch.isfinite(exact).all()
    assert ((exact - x) ** 2).mean() < (x ** 2).mean()  # better than quantizing everything to 0
    # the differentiable version computes the same values and passes gradients to x and to the
    # learnable parameters
    xg = x.clone().requires_grad_(True)
    leaves = {k: v.clone().requires_grad_(k in kind.learnable) for k, v in params.items()}
    ste = kind.fake_ste(xg, leaves, bits)
    np.testing.assert_allclose(ste.detach().numpy(), exact.numpy(), rtol=1e-5, atol=1e-7)
    (ste * torch.randn_like(ste)).sum().backward()
    assert xg.grad.abs().sum() > 0 and torch.isfinite(xg.grad).all()
    assert all(leaves[k].grad is not None and torch.isfinite(leaves[k].grad) for k in kind.learnable)
    kind.check("m/MatMul:0", bits, kind.to_numpy(params))


def test_kinds_reject_bad_parameters():
    uniform = get_kind("uniform")
    with pytest.raises(VitqError, match="has parameters"):
        uniform.check("k", 4, {"scale": np.float32(1)})
    with pytest.raises(VitqError, match="zero point"):
        uniform.check("k", 4, {"scale": np.float32(0.1), "zero_point": np.int32(16)})
    with pytest.raises(VitqError, match="finite"):
        get_kind("log2").check("k", 4, {"scale": np.float32("nan")})
    with pytest.raises(VitqError, match="per_octave one of"):
        get_kind("log2-table").check("k", 6, {"scale": np.float32(0.5), "per_octave": np.float32(3)})
    with pytest.raises(VitqError, match="unknown quantizer kind 'sulq9'"):
        get_kind("sulq9")


def test_quantizer_kind_names_are_dispatched_in_one_place():
    """Only the registries compare kind names: the spec's (codes/spec.py), calibration's
    (calibration/quantizers/kind.py) and the passes' (passes/deploy.py)."""
    root = Path(vitq_onnx.__file__).parent
    registries = {root / "codes" / "spec.py", root / "calibration" / "quantizers" / "kind.py",
                  root / "passes" / "deploy.py"}
    pattern = re.compile(r"""\bkind\s*(==|!=|in)\s*["'(\[{\w]|["']\s*(==|!=)\s*\w*\.?kind\b""")
    assert pattern.search((root / "passes" / "deploy.py").read_text())  # the pattern sees a registry's dispatch
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text())
                 and p not in registries]
    assert offenders == []


def _recipe() -> Recipe:
    return Recipe("m", "repq", 4, 4, activations={
        "a/MatMul:0": ActQuant("uniform", 4, {"scale": np.float32(0.1), "zero_point": np.int32(3)}),
        "b/matmul_av:0": ActQuant("log2", 4, {"scale": np.float32(0.5)})},
        weights={"a/MatMul:1": WeightQuant(4, np.full(3, 0.02, np.float32),
                                           np.array([[1, -8], [7, 0], [0, 0]], np.int8))})


def test_recipe_roundtrip_with_codes_and_version_1_still_loads(tmp_path):
    r = _recipe()
    r.save(tmp_path / "r.json")
    back = Recipe.load(tmp_path / "r.json")
    assert back.activations["b/matmul_av:0"].params["scale"] == np.float32(0.5)
    np.testing.assert_array_equal(back.weights["a/MatMul:1"].codes, r.weights["a/MatMul:1"].codes)
    # a version-1 file: scale and zero point beside the kind, no "params"
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["version"] = 1
    for v in doc["activations"].values():
        v.update(v.pop("params"))
    (tmp_path / "r.json").write_text(json.dumps(doc))
    old = Recipe.load(tmp_path / "r.json")
    assert old.activations["a/MatMul:0"].params["zero_point"] == 3


def test_recipe_load_errors_are_clear(tmp_path):
    r = _recipe()
    r.save(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "v9.json").write_text(json.dumps({**doc, "version": 9}))
    (tmp_path / "v9.npz").write_bytes((tmp_path / "r.npz").read_bytes())
    with pytest.raises(VitqError, match="version 1 or 2 .*found version 9"):
        Recipe.load(tmp_path / "v9.json")
    doc["activations"]["a/MatMul:0"]["kind"] = "log2"  # log2 has no zero point
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    (tmp_path / "bad.npz").write_bytes((tmp_path / "r.npz").read_bytes())
    with pytest.raises(VitqError, match="a/MatMul:0: a log2 quantizer has parameters"):
        Recipe.load(tmp_path / "bad.json")


def test_methods_are_registered_stage_lists():
    assert {"basic", "repq-cw", "repq", "repq-log2", "repq-recon", "ias", "ias-sulq", "ias-stage3"} <= set(METHODS)
    assert [s.name for s in get_method("repq").stages] == ["channelwise_reparam", "fit_weights", "fit_activations"]
    assert get_method("repq-recon").stages[-1].name == "block_reconstruction"
    ias = get_method("ias").stages  # SOS: float-weight reconstruction, weights quantized, reconstruction again
    assert [s.name for s in ias] == ["channelwise_reparam", "fit_activations", "block_reconstruction", "fit_weights",
                                     "block_reconstruction"]
    assert not ias[2].quantized_weights and ias[4].quantized_weights and not ias[1].weights
    assert all(m.description and "\n" not in m.description for m in METHODS.values())
    with pytest.raises(VitqError, match="unknown method 'nope'"):
        get_method("nope")


def test_bit_widths_rules_and_errors():
    bits = BitWidths.parse("4/4", ["blocks.1.*=8/6", "blocks.1.mlp.fc2=3/3"])
    assert bits.weight("blocks.0.attn.qkv/MatMul:1") == 4 and bits.act("blocks.0.attn/matmul_qk:0", "q") == 4
    assert bits.weight("blocks.1.attn.qkv/MatMul:1") == 8 and bits.act("blocks.1.attn/matmul_av:0", "softmax") == 6
    assert bits.act("blocks.1.mlp.fc2/MatMul:0", "linear_input") == 3  # last match wins
    assert bits.act("patch_embed.proj/Conv:0", "conv_input") == 8  # the image stays 8-bit
    assert bits.unmatched(["blocks.0.mlp.fc1/MatMul:0"]) == ["blocks.1.*", "blocks.1.mlp.fc2"]
    for bad, match in [("blocks.1=8", "PATTERN=W/A"), ("=8/8", "PATTERN=W/A"), ("x=9/8", "in 2..8")]:
        with pytest.raises(VitqError, match=match):
            BitWidths.parse("4/4", [bad])
