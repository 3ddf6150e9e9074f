"""Fast tier: ``vitq-onnx eval`` writes accuracy, size, latency and the machine as JSON of a fixed
schema, and with --compare the other model's numbers, the latency ratio and the agreement."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from vitq_onnx.cli import main

from .conftest import TINY

LATENCY = {"type": "object", "required": ["1", "4"], "additionalProperties": False,
           "properties": {"1": {"type": "number", "exclusiveMinimum": 0}, "4": {"type": "number", "exclusiveMinimum": 0}}}
SHARE = {"type": "number", "minimum": 0, "maximum": 1}
MODEL = {"type": "object", "required": ["model", "top1", "top5", "model_bytes", "latency_ms"],
         "properties": {"model": {"type": "string"}, "top1": SHARE, "top5": SHARE,
                        "model_bytes": {"type": "integer", "minimum": 1}, "latency_ms": LATENCY}}
SCHEMA = {
    "type": "object",
    "allOf": [MODEL],
    "required": ["images", "machine", "compare", "latency_ratio", "top1_agreement"],
    "properties": {
        "images": {"type": "integer", "minimum": 1},
        "machine": {"type": "object", "required": ["cpu", "cpu_flags", "vnni", "amx", "onnxruntime",
                                                   "intra_op_threads"],
                    "properties": {"cpu": {"type": "string"}, "cpu_flags": {"type": "array", "items": {"type": "string"}},
                                   "vnni": {"type": "boolean"}, "amx": {"type": "boolean"},
                                   "onnxruntime": {"type": "string"}, "intra_op_threads": {"type": "integer"}}},
        "compare": MODEL,
        "latency_ratio": {**LATENCY, "properties": {"1": {"type": "number"}, "4": {"type": "number"}}},
        "top1_agreement": SHARE,
    },
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_calib_dir):
    """The tiny model at 8/8 and its FP32 graph (the first --save-passes snapshot)."""
    work = tmp_path_factory.mktemp("eval")
    assert main(["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "-q",
                 "--save-passes", str(work / "passes"), "-o", str(work / "w8.onnx")]) == 0
    images = work / "val"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, synset in enumerate(["n01440764", "n01443537", "n01484850"] * 2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{synset}_{i}.png")
    return work / "w8.onnx", work / "passes" / "00_fp32.onnx", images


def test_eval_json_follows_the_schema(exported, tmp_path, capsys):
    model, fp32, images = exported
    out = tmp_path / "eval.json"
    assert main(["eval", str(model), "--compare", str(fp32), "--images", str(images), "--latency-batch", "4",
                 "--threads", "1", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    jsonschema.validate(result, SCHEMA)
    assert result["images"] == 6 and result["machine"]["intra_op_threads"] == 1
    assert result["model_bytes"] < result["compare"]["model_bytes"]  # 8-bit weights are smaller
    ratio = result["latency_ratio"]["1"]
    assert ratio == pytest.approx(result["latency_ms"]["1"] / result["compare"]["latency_ms"]["1"], rel=0.5)
    printed = capsys.readouterr().out
    assert "latency w8.onnx / 00_fp32.onnx: batch 1" in printed and "threads, onnxruntime" in printed


def test_eval_without_latency_and_bad_options(exported, capsys):
    model, _, images = exported
    assert main(["eval", str(model), "--images", str(images), "--no-latency", "-q"]) == 0
    assert "ms" not in capsys.readouterr().out
    assert main(["eval", str(model), "--images", str(images), "--latency-batch", "0"]) == 1
    assert "--latency-batch must be at least 1" in capsys.readouterr().err


def test_python_api_example_runs(tiny_calib_dir, tmp_path, capsys):
    """examples/api_export.py end to end on the tiny model: in-memory module and tensor in, model out."""
    import runpy

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "api_export.py"))
    report = example["main"](["--model", TINY, "--calib", str(tiny_calib_dir), "--bits", "4/4", "--method", "repq",
                              "-o", str(tmp_path / "api.onnx")])
    assert report["exact_images"] == 1.0 and (tmp_path / "api.recipe.json").is_file()
    assert "bit for bit" in capsys.readouterr().out


def test_python_api_takes_names_folders_and_batches(tiny_calib_dir, tiny_images):
    import vitq_onnx
    from vitq_onnx.errors import VitqError

    by_name = vitq_onnx.export(TINY, "8/8", tiny_calib_dir, random_weights=True, validate_images=3)
    assert by_name.report["images"] == 3 and by_name.report["top1_agreement"] == 1.0
    assert by_name.recipe.model == TINY
    batches = vitq_onnx.export(TINY, "8/8", [tiny_images[:5], tiny_images[5:10]], random_weights=True)
    assert batches.report["images"] == 8 and batches.recipe.info["num_calib"] == 10
    with pytest.raises(VitqError, match=r"shape \[3, 32, 32\]"):
        vitq_onnx.export(TINY, "8/8", np.zeros((2, 3, 16, 16), np.float32), random_weights=True)


def test_eval_of_a_headless_model_compares_features(tmp_path, tiny_calib_dir, capsys):
    """No classes, so no labels (the images need no synset names): features against the FP32 graph."""
    out = tmp_path / "features.onnx"
    assert main(["export", "--model", TINY, "--random-weights", "--num-classes", "0", "--bits", "4/4", "--method", "repq", "-q",
                 "--calib", str(tiny_calib_dir), "--save-passes", str(tmp_path / "passes"), "-o", str(out)]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--compare", str(tmp_path / "passes" / "00_fp32.onnx"), "--images",
                 str(tiny_calib_dir), "--no-latency", "--json", str(report), "-q"]) == 0
    result = json.loads(report.read_text())
    assert "top1" not in result and result["features"] == 32 and result["images"] == 8
    sim = result["feature_similarity"]
    assert 0.5 < sim["cosine_min"] <= sim["cosine_mean"] <= 1.0 + 1e-9 and sim["max_abs_error"] > 0
    assert "feature cosine mean" in capsys.readouterr().out
