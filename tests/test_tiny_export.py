"""Fast tier: every pass and format on a tiny random ViT, bit-exact against the simulation; mixed
widths visible in the graph; the CLI end to end on a model timm builds by name."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import METHODS, get_method
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.cli import main
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.passes.pair_bounds import pair_bounds
from vitq_onnx.recipe import Recipe
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import compare_logits, torch_logits

from .conftest import TINY

QUIET = CalibOptions(progress=False)


def _exact(model, recipe, onnx_model, images):
    return compare_logits(torch_logits(simulate(model, recipe), images),
                          runtime.run(runtime.session(onnx_model), images))


@pytest.mark.parametrize("method", ["basic", "repq", "repq-log2", "repq-recon", "ias", "ias-sulq"])
@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_every_method_and_format_is_bit_exact(tiny, tiny_images, tiny_fp32_onnx, method, fmt, tmp_path):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), get_method(method), "tiny", QUIET)
    passes = pipeline(recipe, fmt)
    model = run_passes(tiny_fp32_onnx, passes, PassContext(recipe, fmt), tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == len(passes) + 1  # every pass saved for Netron
    report = _exact(tiny, recipe, model, tiny_images[8:])
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0


def _with_outputs(model, names):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_two_layers_at_other_widths_show_their_integer_ranges(tiny, tiny_images, tiny_fp32_onnx, fmt):
    bits = BitWidths.parse("4/4", ["blocks.0.mlp.fc1=8/8", "blocks.1.mlp.fc2=3/3"])
    recipe = calibrate(tiny, tiny_images[:8], bits, get_method("repq"), "tiny", QUIET)
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["blocks.0.mlp.fc1/weight_int8"].dtype == np.uint8  # 8-bit weights: uint8, zero point 128
    w3 = inits["blocks.1.mlp.fc2/weight_int3"].astype(np.int16)
    w4 = inits["blocks.0.mlp.fc2/weight_int4"].astype(np.int16)
    assert w3.min() >= -4 and w3.max() <= 3 and w4.min() >= -8 and w4.max() <= 7 and w4.min() < -4
    if fmt == "ort":  # 8-bit containers onnxruntime can return (qdq's uint4 it cannot)
        codes = ["blocks.0.mlp.fc1/input_uint8", "blocks.1.mlp.fc2/input_uint3", "blocks.0.mlp.fc2/input_uint4"]
        a8, a3, a4 = runtime.session(_with_outputs(model, codes)).run(codes, {"image": tiny_images})
        assert a8.max() > 15 and a3.max() <= 7 and a4.max() <= 15 and a3.max() > 3
    else:
        types = {i.name: i.data_type for i in model.graph.initializer}
        assert types["blocks.0.mlp.fc1/input_zero_point"] == onnx.TensorProto.UINT8
        assert types["blocks.1.mlp.fc2/input_zero_point"] == onnx.TensorProto.UINT4
        assert "blocks.1.mlp.fc2/input_clip" in {n.name for n in model.graph.node}  # 3 bits in 4
    report = _exact(tiny, recipe, model, tiny_images)
    assert report["max_abs_logit_error"] == 0.0


def _export(tmp_path, calib, *extra):
    out = tmp_path / "tiny.onnx"
    code = main(["export", "--model", TINY, "--random-weights", "--calib", str(calib), "--num-calib", "8",
                 "-q", "-o", str(out), *extra])
    return code, out


def test_cli_export_with_layer_bits_writes_the_map_into_the_metadata(tmp_path, tiny_calib_dir, capsys):
    code, out = _export(tmp_path, tiny_calib_dir, "--bits", "4/4", "--method", "repq", "--layer-bits", "blocks.1.*=6/6")
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert meta["vitq.recipe"]["bits"] == {"w": 4, "a": 4, "layers": ["blocks.1.*=6/6"]}
    tensor_bits = meta["vitq.recipe"]["tensor_bits"]
    assert tensor_bits["blocks.1.mlp.fc2/MatMul:1"] == 6 and tensor_bits["blocks.0.mlp.fc2/MatMul:1"] == 4
    assert meta["vitq.validation"]["top1_agreement"] == 1.0


def test_cli_method_help_comes_from_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help is wrapped
    for m in METHODS.values():
        assert f"{m.name}: {m.description}" in out


@pytest.mark.parametrize("extra, match", [
    (["--layer-bits", "blocks.9.*=8/8"], "matches no quantized layer"),
    (["--layer-bits", "blocks.1.*"], "PATTERN=W/A"),
    (["--time-budget", "0"], "--time-budget must be"),
    (["--device", "tpu9"], "--device"),
    (["--num-calib", "0"], "--num-calib must be at least 1"),
])
def test_cli_bad_calibration_options_are_one_line_errors(tmp_path, tiny_calib_dir, capsys, extra, match):
    code, out = _export(tmp_path, tiny_calib_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1]
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_export_on_gpu_stays_bit_exact(tmp_path, tiny_calib_dir):
    code, out = _export(tmp_path, tiny_calib_dir, "--bits", "4/4", "--method", "repq-recon", "--device", "cuda")
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert code == 0 and meta["vitq.validation"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("method", ["repq-log2", "ias-sulq"])
def test_qdq_post_softmax_is_integer_shifts_without_exp(tiny, tiny_images, tiny_fp32_onnx, method):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), get_method(method), "tiny", QUIET)
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, "qdq"), PassContext(recipe, "qdq"), progress=False)
    ops = [n.op_type for n in model.graph.node]
    softmax_quantizers = [q for q in recipe.activations.values() if q.kind in ("log2", "sulq")]
    assert len(softmax_quantizers) == 2  # one per block
    assert ops.count("BitShift") >= len(softmax_quantizers) and "Exp" not in ops and "Pow" not in ops


@pytest.mark.parametrize("bits", [6, 7])
@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_log2_table_softmax_is_bit_exact_in_both_formats(tiny, tiny_images, tiny_fp32_onnx, fmt, bits):
    """ias at 6-7 bits: ``ort`` makes the levels with float kernels and one float GEMM; ``qdq``
    reads their 7-bit digits from tables into two integer GEMMs; both bit-exact."""
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(bits, bits), get_method("ias"), "tiny", QUIET)
    assert sorted({q.kind for q in recipe.activations.values()}) == ["log2-table", "uniform"]
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    tables = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_table")]
    level_ops = [n.op_type for n in model.graph.node if "attn_level" in n.name]
    if fmt == "ort":  # no table lookups (onnxruntime's Gather is slow)
        assert tables == [] and level_ops.count("Exp") == level_ops.count("Round") == level_ops.count("MatMul") == 2
    else:
        assert len(tables) == 2 * 2 and all(t.dtype == np.uint8 and len(t) == 2**bits and t.max() <= 128 for t in tables)
        assert level_ops.count("Gather") == 2 * 2 and "Exp" not in level_ops
        # the pair bound reads the tables: digits <= 128 times v's signed codes, far from int16
        bounds = pair_bounds(gs.import_onnx(model))
        digit_gemms = [v for k, v in bounds.items() if k.endswith(("attn_high_sum_int32", "attn_low_sum_int32"))]
        assert len(digit_gemms) == 2 * 2 and max(digit_gemms) <= 2 * 128 * 2 ** (bits - 1)
    report = _exact(tiny, recipe, model, tiny_images[8:])
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0


@pytest.mark.parametrize("why", ["v too wide", "top level not 0"])
def test_log2_table_ort_takes_the_integer_digits_where_a_float_sum_could_round(tiny, tiny_images, tiny_fp32_onnx,
                                                                              monkeypatch, why):
    """Where the float GEMM's 2^24 bound does not hold (v's codes too wide: here the bound made
    tiny; or a 3-bit table whose top level is not 0, so every tiny probability adds to the sum)
    ``ort`` falls back to the tables' integer GEMMs, the same exact sums, still bit-exact."""
    from vitq_onnx.passes import log2_table_softmax
    from vitq_onnx.recipe import ActQuant

    recipe = calibrate(tiny, tiny_images[:8], BitWidths(6, 6), get_method("ias"), "tiny", QUIET)
    if why == "v too wide":
        monkeypatch.setattr(log2_table_softmax, "FLOAT_EXACT", 1.0)
    else:
        for key, q in list(recipe.activations.items()):
            if q.kind == "log2-table":
                recipe.activations[key] = ActQuant(q.kind, 3, {**q.params, "per_octave": np.float32(1)})
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, "ort"), PassContext(recipe, "ort"), progress=False)
    level_ops = [n.op_type for n in model.graph.node if "attn_level" in n.name]
    assert level_ops.count("Gather") == 2 * 2 and "Exp" not in level_ops
    report = _exact(tiny, recipe, model, tiny_images[8:])
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_sulq_with_two_uint8_parts_is_bit_exact(tiny, tiny_images, tiny_fp32_onnx, fmt, monkeypatch):
    """eta = 2^-12: 2^i reaches 2^12, above uint8, so each attention@v takes a second GEMM."""
    from vitq_onnx.calibration.quantizers import sulq

    monkeypatch.setattr(sulq.SULQ, "etas", (2.0**-12,))
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(4, 4), get_method("ias-sulq"), "tiny", QUIET)
    model = run_passes(tiny_fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    gemms = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
    assert sum("part1" in n.name for n in gemms) == 2  # one second part per block
    report = _exact(tiny, recipe, model, tiny_images)
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0


def test_cli_recipe_redeploys_one_calibration_in_the_other_format(tmp_path, tiny_calib_dir, capsys):
    code, ort_out = _export(tmp_path, tiny_calib_dir, "--bits", "4/4", "--method", "ias-sulq")
    assert code == 0
    given = ort_out.with_name("tiny.recipe.json")
    qdq_out = tmp_path / "tiny_qdq.onnx"
    code = main(["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "--num-calib", "8",
                 "-q", "--recipe", str(given), "--format", "qdq", "-o", str(qdq_out)])
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(qdq_out).metadata_props}
    assert meta["vitq.recipe"]["method"] == "ias-sulq" and meta["vitq.recipe"]["bits"]["w"] == 4
    assert meta["vitq.validation"]["top1_agreement"] == 1.0
    a, b = (Recipe.load(p.with_name(p.stem + ".recipe.json")) for p in (ort_out, qdq_out))
    assert a.activations.keys() == b.activations.keys() and all(
        a.activations[k].params["eta" if a.activations[k].kind == "sulq" else "scale"]
        == b.activations[k].params["eta" if b.activations[k].kind == "sulq" else "scale"] for k in a.activations)
    for extra, match in ((["--bits", "4/4"], "--recipe already fixes"),
                         (["-o", str(tmp_path / "tiny.onnx")], "overwrite")):
        capsys.readouterr()
        out = tmp_path / "again.onnx"
        args = ["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "-q",
                "--recipe", str(given), "-o", str(out), *extra]
        assert main(args) == 1
        assert match in capsys.readouterr().err.strip().splitlines()[-1]
