"""vitq-onnx report on a tiny random ViT: every quantized tensor, errors that mean what they say,
float layers shown as float, files written, clear errors (fast tier)."""

import csv
import json
import math
import shutil

import pytest
import torch

from vitq_onnx.cli import main
from vitq_onnx.layer_report import Error, block_of, layer_report
from vitq_onnx.calibration.bits import module_of
from vitq_onnx.naming import tensor_label
from vitq_onnx.recipe import Recipe, split_key

from .conftest import TINY


def test_sqnr_and_cosine_are_the_textbook_ones():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(10000, generator=gen)
    noise = 0.1 * torch.randn(10000, generator=gen)
    err = Error()
    err.add(ref[:5000], ref[:5000] + noise[:5000])  # in two batches: running sums
    err.add(ref[5000:], ref[5000:] + noise[5000:])
    expected = 10 * math.log10(float(ref.pow(2).sum() / noise.pow(2).sum()))
    assert err.sqnr_db() == pytest.approx(expected, abs=1e-4)
    assert err.cosine() == pytest.approx(float(torch.nn.functional.cosine_similarity(ref, ref + noise, 0)), abs=1e-6)
    exact = Error()
    exact.add(ref, ref)
    assert exact.sqnr_db() is None and exact.cosine() == pytest.approx(1.0)


def test_block_of_names_the_transformer_block():
    assert block_of("blocks.3.mlp.fc1") == "blocks.3"
    assert block_of("layers.1.blocks.0.attn") == "layers.1.blocks.0"
    assert block_of("head") == "head" and block_of("patch_embed.proj") == "patch_embed.proj"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_calib_dir):
    folder = tmp_path_factory.mktemp("report")
    models = {}
    for name, extra in (("w4a4", []), ("keep", ["--keep-float", "blocks.1.mlp.fc2", "--keep-float",
                                                 "blocks.0.attn.matmul_av"])):
        out = folder / f"{name}.onnx"
        assert main(["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "--num-calib",
                     "8", "--bits", "4/4", "--method", "repq", "-q", "-o", str(out), *extra]) == 0
        models[name] = out
    return models


def test_report_lists_every_quantized_tensor_with_errors_that_hold(exported, tiny_calib_dir):
    report = layer_report(exported["w4a4"], tiny_calib_dir, num_images=8, random_weights=True, progress=False)
    recipe = Recipe.load(exported["w4a4"].with_name("w4a4.recipe.json"))
    rows = report["tensors"]
    assert report["quantized_tensors"] == len(rows) == len(recipe.tensor_bits()) and report["float_layers"] == 0
    assert [r["depth"] for r in rows] == sorted(r["depth"] for r in rows)
    first = rows[0]  # the image entering the patch embedding: nothing before it is quantized
    assert (first["module"], first["tensor"], first["bits"]) == ("patch_embed.proj", "input", 8)
    assert first["sqnr_db"] == pytest.approx(first["quant_sqnr_db"], abs=1e-6)
    later = [r for r in rows if r["kind"] not in ("weight", "float") and r["depth"] > 5]
    assert any(r["sqnr_db"] < r["quant_sqnr_db"] for r in later)  # errors pile up along the depth
    assert all(-1 <= r["cosine"] <= 1 and r["sqnr_db"] is not None for r in rows)
    expected = {(module_of(k), tensor_label(*split_key(k)).rpartition("/")[2]): b
                for k, b in recipe.tensor_bits().items()}
    assert {(r["module"], r["tensor"]): r["bits"] for r in rows} == expected
    assert report["output"]["onnx_top1_agreement"] >= 0.5


def test_kept_float_layers_show_as_float(exported, tiny_calib_dir):
    report = layer_report(exported["keep"], tiny_calib_dir, num_images=8, random_weights=True, progress=False)
    floats = {r["module"]: r for r in report["tensors"] if r["kind"] == "float"}
    assert set(floats) == {"blocks.1.mlp.fc2", "blocks.0.attn.matmul_av"} and report["float_layers"] == 2
    assert floats["blocks.1.mlp.fc2"]["bits"] is None and floats["blocks.1.mlp.fc2"]["sqnr_db"] is not None
    assert not any(r["module"] == "blocks.1.mlp.fc2" and r["kind"] != "float" for r in report["tensors"])


def test_cli_report_writes_json_csv_and_plot(exported, tiny_calib_dir, tmp_path, capsys):
    files = [tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"]
    code = main(["report", str(exported["w4a4"]), "--images", str(tiny_calib_dir), "--random-weights",
                 "--num-images", "8", "--top", "3", "--sort", "quant_sqnr", "-q", "--json", str(files[0]),
                 "--csv", str(files[1]), "--plot", str(files[2])])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and "quantized tensors" in out[0] and len(out) == 2 + 3  # summary, header, top 3
    report = json.loads(files[0].read_text())
    with files[1].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(report["tensors"])
    own = [float(r["quant_sqnr_db"]) for r in table if r["quant_sqnr_db"]]
    assert own == sorted(own)  # --sort quant_sqnr: worst first
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_errors_are_one_line(exported, tiny_calib_dir, tmp_path, capsys):
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["w4a4"], lone)
    other = tmp_path / "other.onnx"  # a recipe beside it that is another model's
    shutil.copy(exported["w4a4"], other)
    for suffix in (".recipe.json", ".recipe.npz"):
        shutil.copy(exported["keep"].with_name("keep" + suffix), other.with_name("other" + suffix))
    cases = [([str(lone)], "no recipe beside"), ([str(other)], "is not the recipe of"),
             ([str(exported["w4a4"]), "--plot", str(tmp_path / "p.gif")], "use a .png"),
             ([str(tmp_path / "missing.onnx")], "model not found")]
    for args, match in cases:
        capsys.readouterr()
        code = main(["report", *args, "--images", str(tiny_calib_dir), "--random-weights", "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1], err
    assert not (tmp_path / "p.gif").exists()


def test_report_without_weights_asks_for_the_checkpoint_at_once(exported, tiny_calib_dir, capsys):
    assert main(["report", str(exported["w4a4"]), "--images", str(tiny_calib_dir), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --weights FILE, that checkpoint of" in err[0], err
