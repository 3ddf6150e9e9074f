"""Fast tier: ``--method auto`` (the default) and the expected time the export prints."""

import json

import pytest

from vitq_onnx.calibration.methods import AUTO, auto_method, get_method
from vitq_onnx.cli import main
from vitq_onnx.options import ExportOptions, resolved
from vitq_onnx.orchestrator.inputs import check
from vitq_onnx.orchestrator.recipe_source import expected_seconds
from vitq_onnx.recipe import Recipe

from .conftest import TINY


@pytest.mark.parametrize("narrowest, method", [(8, "repq"), (7, "repq"), (6, "ias"), (5, "ias"),
                                               (4, "repq-recon"), (3, "ias")])
def test_auto_takes_the_tables_method_for_the_narrowest_width(narrowest, method):
    assert auto_method(narrowest).name == method
    assert [least for least, _ in AUTO] == sorted((least for least, _ in AUTO), reverse=True)


@pytest.mark.parametrize("given, method", [({"bits": "8/8"}, "repq"), ({"bits": "8/4"}, "repq-recon"),
                                           ({"bits": "8/8", "layer_bits": ("blocks.1.*=4/3",)}, "ias"),
                                           ({"bits": "8/8", "avg_bits": 4.5}, "repq-recon"),
                                           ({"bits": "4/4", "method": "repq"}, "repq")])
def test_the_narrowest_width_asked_anywhere_decides(given, method):
    """Weights or activations, a --layer-bits rule, the --avg-bits average; a named method stays."""
    assert check(resolved(ExportOptions(**given)))[0].name == method


def test_expected_time_counts_each_stages_passes_and_steps():
    repq, recon = get_method("repq").stages, get_method("repq-recon").stages
    assert expected_seconds(repq, 100, 0.01) == pytest.approx(0.01 * 100 * sum(s.image_passes for s in repq))
    steps = recon[-1].iters * recon[-1].batch_size  # the reconstruction's steps: the same for any depth
    assert expected_seconds(recon, 100, 0.01) > expected_seconds(repq, 100, 0.01) + 0.01 * steps
    assert expected_seconds(recon, 100, 0.02) == pytest.approx(2 * expected_seconds(recon, 100, 0.01))


def test_the_default_export_says_its_choice_and_expected_time(tmp_path, tiny_calib_dir, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", TINY, "--random-weights", "--calib", str(tiny_calib_dir), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "method auto: repq for 8-bit layers" in captured.err and "expected about" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["exact_images"] == 1.0
    assert Recipe.load(out.with_suffix(".recipe.json")).method == "repq"


def test_help_lists_auto_as_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "- auto: the method for the narrowest width asked" in out and "(default auto)" in out
