"""Greedy mixed precision (--avg-bits): the greedy meets the budget by the least KL per saved bit,
and the tiny ViT exports with a mixed map, bit-exact (fast tier)."""

import json

import onnx
import pytest

from vitq_onnx.calibration.mixed_precision import Layer, averages, greedy, layer_rules
from vitq_onnx.errors import VitqError

from .test_tiny_export import _export


def _layers():
    robust = Layer("robust", "robust/MatMul:1", ["robust/MatMul:0"], params=100, elements=10,
                   kl={8: 0.0, 6: 0.0, 5: 0.01, 4: 0.02, 3: 0.05})
    fragile = Layer("fragile", "fragile/MatMul:1", ["fragile/MatMul:0"], params=100, elements=10,
                    kl={8: 0.0, 6: 0.5, 5: 1.0, 4: 2.0, 3: 4.0})
    attention = Layer("attn", None, ["attn/matmul_qk:0"], params=0, elements=20,
                      kl={8: 0.0, 6: 0.0, 5: 0.0, 4: 0.1, 3: 0.3})
    return [robust, fragile, attention]


def test_greedy_meets_the_budget_narrowing_what_costs_least():
    layers = _layers()
    width = greedy(layers, 6.0)
    w_avg, a_avg = averages(layers, width)
    assert w_avg <= 6.0 and a_avg <= 6.0
    assert width["fragile"] == 8 and width["robust"] <= 4  # the robust layer pays for both
    assert layer_rules(layers, width, 8) == [f"robust={width['robust']}/{width['robust']}", "fragile=8/8",
                                             f"attn=8/{width['attn']}"]
    assert greedy(layers, 8.0) == {"robust": 8, "fragile": 8, "attn": 8}  # nothing to save


def test_greedy_says_when_the_budget_cannot_be_met():
    with pytest.raises(VitqError, match="narrowest width"):
        greedy(_layers(), 3.5, widths=(8, 6, 4))


def test_cli_avg_bits_exports_a_mixed_map_bit_exact(tmp_path, tiny_calib_dir):
    code, out = _export(tmp_path, tiny_calib_dir, "--avg-bits", "5")
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    mixed = meta["vitq.recipe"]["mixed_precision"]
    assert mixed["weight_avg"] <= 5 and mixed["activation_avg"] <= 5
    assert len(set(meta["vitq.recipe"]["tensor_bits"].values())) > 2  # the 8-bit stem and at least two widths
    assert meta["vitq.validation"]["exact_images"] == 1.0


@pytest.mark.parametrize("extra, match", [
    (["--avg-bits", "2.5"], "--avg-bits must be between 3 and 8"),
    (["--avg-bits", "5", "--layer-bits", "head=8/8"], "drop --layer-bits"),
])
def test_cli_bad_avg_bits_is_one_line_error(tmp_path, tiny_calib_dir, capsys, extra, match):
    code, out = _export(tmp_path, tiny_calib_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1]
    assert not out.exists()
