"""--keep-float: the layers it names stay float in the graph, the simulation and the recipe, and
the export stays bit-exact (fast tier, tiny random ViT)."""

import json

import numpy as np
import onnx
import pytest

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.recipe import Recipe, split_key
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import torch_logits

from .test_tiny_export import _export

QUIET = CalibOptions(progress=False)


def _node(layer: str) -> str:
    """The graph node of a float layer: 'blocks.0.attn.matmul_av' -> 'blocks.0.attn/matmul_av'."""
    module, _, last = layer.rpartition(".")
    if last.startswith("matmul_"):
        return f"{module}/{last}"
    return f"{layer}/Conv" if layer.startswith("patch_embed") else f"{layer}/MatMul"


@pytest.mark.parametrize("patterns, floats", [
    (["head"], ["head"]),
    (["patch_embed"], ["patch_embed.proj"]),
    (["blocks.1.attn"], ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.matmul_qk",
                         "blocks.1.attn.matmul_av"]),
    (["blocks.0.mlp.fc1", "blocks.*.attn.matmul_av"], ["blocks.0.mlp.fc1", "blocks.0.attn.matmul_av",
                                                        "blocks.1.attn.matmul_av"]),
])
@pytest.mark.parametrize("method, fmt", [("repq", "ort"), ("repq", "qdq"), ("ias-sulq", "qdq")])
def test_kept_float_layers_are_float_everywhere_and_bit_exact(tiny, tiny_images, tiny_fp32_onnx, patterns, floats,
                                                              method, fmt):
    bits = BitWidths.parse("4/4", keep_float=patterns)
    recipe = calibrate(tiny, tiny_images[:8], bits, get_method(method), "tiny", QUIET)
    assert sorted(recipe.float_layers) == sorted(floats)
    nodes = [_node(name) for name in floats]
    assert not {split_key(k)[0] for k in recipe.tensor_bits()} & set(nodes)  # no quantizer of a float layer
    assert len(recipe.tensor_bits()) > 2 * len(floats)  # the rest is still quantized
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    graph = {n.name: n for n in model.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in nodes:  # the float op itself, on float32 weights
        assert graph[node].op_type in ("MatMul", "Conv")
        weight = graph[node].input[1]
        assert weight not in inits or inits[weight].dtype == np.float32
    sim = torch_logits(simulate(tiny, recipe), tiny_images)
    assert (sim == runtime.run(runtime.session(model), tiny_images)).all()  # bit-exact on every image


def test_recipe_keeps_its_float_layers_through_save_and_load(tiny, tiny_images, tmp_path):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths.parse("4/4", keep_float=["head"]), get_method("repq"),
                       "tiny", QUIET)
    recipe.save(tmp_path / "r.json")
    again = Recipe.load(tmp_path / "r.json")
    assert again.keep_float == ["head"] and again.float_layers == ["head"]
    sim_a, sim_b = (torch_logits(simulate(tiny, r), tiny_images) for r in (recipe, again))
    assert (sim_a == sim_b).all()


def test_cli_exclude_is_keep_float_and_lands_in_the_metadata(tmp_path, tiny_calib_dir):
    code, out = _export(tmp_path, tiny_calib_dir, "--bits", "4/4", "--method", "repq", "--exclude", "head", "--keep-float",
                        "blocks.1.mlp.*")
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert meta["vitq.recipe"]["keep_float"] == ["head", "blocks.1.mlp.*"]
    assert meta["vitq.recipe"]["float_layers"] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"]
    assert "head/MatMul:1" not in meta["vitq.recipe"]["tensor_bits"]
    assert meta["vitq.validation"]["exact_images"] == 1.0


@pytest.mark.parametrize("extra, match", [
    (["--keep-float", "blocks.7.*"], "matches no Linear, Conv or attention module"),
    (["--keep-float", ""], "--keep-float needs a module name"),
    (["--keep-float", "*"], "nothing is left to quantize"),
])
def test_cli_bad_keep_float_is_one_line_error(tmp_path, tiny_calib_dir, capsys, extra, match):
    code, out = _export(tmp_path, tiny_calib_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_deit_with_half_its_blocks_float_is_bit_exact(deit, calib_images, val_images, fp32_onnx, fmt):
    """Float GEMMs at DeiT-Ti's sizes: onnxruntime packs constant weights for other kernels than
    run-time ones, so the simulation must run each float layer with its weight as a constant."""
    bits = BitWidths.parse("4/4", keep_float=["blocks.[0-5].*", "head", "blocks.9.attn.matmul_qk"])
    recipe = calibrate(deit, calib_images, bits, get_method("repq"), "deit_tiny_patch16_224", QUIET)
    model = run_passes(fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    images = np.concatenate([calib_images, val_images])
    sim = torch_logits(simulate(deit, recipe), images)
    assert (sim == runtime.run(runtime.session(model), images)).all()
