"""Greedy mixed precision (--avg-bits, --max-drop): the greedy meets the budget by the least KL per
saved bit, the drop target takes the furthest map within it, and the tiny ViT exports with a mixed
map, bit-exact (fast tier)."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from vitq_onnx.calibration import mixed_precision
from vitq_onnx.calibration.bits import STEM_BITS, BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import REPQ_SOFTMAX, get_method
from vitq_onnx.calibration.mixed_precision import (Layer, averages, choose_widths, greedy, greedy_path, layer_rules,
                                                   expected_drop, label_margins, longest_within, measure,
                                                   widths_for_drop)
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.errors import VitqError

from .test_tiny_export import _export


def _layers():
    """Knobs of two Linears and an attention: the "robust" Linear's weight tolerates narrow widths
    but its input does not, the "fragile" one the reverse."""
    cheap, dear = {8: 0.0, 6: 0.0, 5: 0.01, 4: 0.02, 3: 0.05}, {8: 0.0, 6: 0.5, 5: 1.0, 4: 2.0, 3: 4.0}
    return [Layer("robust", "robust/MatMul:1", [], params=100, kl=cheap),
            Layer("robust", None, ["robust/MatMul:0"], elements=10, kl=dear),
            Layer("fragile", "fragile/MatMul:1", [], params=100, kl=dear),
            Layer("fragile", None, ["fragile/MatMul:0"], elements=10, kl=cheap),
            Layer("attn", None, ["attn/matmul_qk:0"], elements=20, kl={8: 0.0, 6: 0.0, 5: 0.0, 4: 0.1, 3: 0.3})]


def test_greedy_meets_the_budget_narrowing_what_costs_least():
    layers = _layers()
    width = greedy(layers, 6.0)
    w_avg, a_avg = averages(layers, width)
    assert w_avg <= 6.0 and a_avg <= 6.0
    # weights and inputs are lowered apart: each budget is paid by its cheap knobs
    assert width["fragile:w"] == 8 and width["robust:w"] <= 4
    assert width["robust:a"] == 8 and width["fragile:a"] < 8
    assert layer_rules(layers, width, 8) == [f"robust={width['robust:w']}/8", f"fragile=8/{width['fragile:a']}",
                                             f"attn=8/{width['attn:a']}"]
    assert set(greedy(layers, 8.0).values()) == {8}  # nothing to save


def test_greedy_says_when_the_budget_cannot_be_met():
    with pytest.raises(VitqError, match="narrowest widths allowed"):
        greedy(_layers(), 3.5, widths=(8, 6, 4))


def test_greedy_keeps_a_floor_and_pays_the_budget_with_the_other_knobs():
    layers = _layers()
    for layer in layers:
        layer.floor = 4 if layer.weight else 0
    width = greedy(layers, 4.0)
    assert greedy(_layers(), 4.0)["robust:w"] == 3  # without the floor
    assert width["robust:w"] == 4 and width["fragile:w"] == 4
    assert averages(layers, width)[1] <= 4.0 and min(width[k.name] for k in layers if not k.weight) == 3
    with pytest.raises(VitqError, match=r"weights 4\.00, activations 3\.00"):
        greedy(layers, 3.5)


def test_greedy_path_lowers_one_knob_one_width_at_a_time_to_the_narrowest():
    layers = _layers()
    path = greedy_path(layers)
    assert set(path[0].values()) == {8} and set(path[-1].values()) == {3}
    for a, b in zip(path, path[1:]):
        assert sum(a[k] != b[k] for k in a) == 1 and all(b[k] <= a[k] for k in a)
    assert path.index(next(p for p in path if p["fragile:w"] < 8)) > path.index(next(p for p in path if p["robust:w"] == 3))


def test_layer_rules_keep_the_stem_input_at_its_width():
    stem = [Layer("patch_embed.proj", "patch_embed.proj/Conv:1", [], params=10, kl={8: 0.0, 4: 0.1})]
    assert layer_rules(stem, {"patch_embed.proj:w": 4}, 8) == [f"patch_embed.proj=4/{STEM_BITS}"]


def test_longest_within_bisects_to_the_last_step_inside_the_drop():
    calls = []

    def drop(step):
        calls.append(step)
        return 0.25 * step

    step, seen = longest_within(list(range(100)), drop, 4.0)
    assert step == 16 and seen[16] <= 4.0 < seen[min(k for k in seen if k > 16)]
    assert len(calls) <= 9  # log2(100) + the widest map


def test_expected_drop_smooths_the_counted_drop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    fp = rng.normal(size=(200, 10)).astype(np.float32)
    fp[np.arange(200), labels] += 1.0  # most right
    q = fp + rng.normal(scale=0.5, size=fp.shape).astype(np.float32)
    assert expected_drop(fp, fp, labels) == 0.0
    counted = 100 * ((fp.argmax(1) == labels).mean() - (q.argmax(1) == labels).mean())
    assert expected_drop(fp, q, labels, smoothing=1e-6) == pytest.approx(counted)  # no smoothing: the count
    lowered = fp.copy()
    lowered[np.arange(200), labels] -= 0.3  # every margin smaller: a drop, growing as they shrink
    assert 0 < expected_drop(fp, lowered, labels) < expected_drop(fp, lowered - 0.5 * np.eye(10)[labels], labels)
    m, mq = label_margins(fp, labels), label_margins(q, labels)
    tau = 0.45 * np.median(np.abs(m))
    phi = lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / tau / math.sqrt(2)))
    assert expected_drop(fp, q, labels) == pytest.approx(100 * (phi(m).mean() - phi(mq).mean()))


def test_a_method_that_reconstructs_weights_keeps_them_at_4_bits_or_more(tiny, tiny_images):
    assert get_method("repq-recon").trains_quantized_weights and get_method("ias").trains_quantized_weights
    assert not get_method("repq").trains_quantized_weights
    maps = {r: choose_widths(tiny, tiny_images, BitWidths(8, 8), 4.0, "tiny", lambda m: None, False,
                             get_method("repq-recon" if r else "repq"))[1] for r in (False, True)}
    weights = {r: [w for k, w in m["widths"].items() if k.endswith(":w")] for r, m in maps.items()}
    assert min(weights[False]) == 3 and set(weights[True]) == {4}  # the weight average of 4: all at 4
    assert maps[True]["weight_floor"] == 4 and "weight_floor" not in maps[False]
    assert maps[True]["activation_avg"] <= 4.0


def test_max_drop_keeps_the_widest_map_when_nothing_narrower_fits(tiny, tiny_images):
    labels = torch.no_grad()(tiny)(torch.from_numpy(tiny_images[8:])).argmax(1).numpy()  # FP top-1 is 100 %
    loose, info = widths_for_drop(tiny, tiny_images[:8], (tiny_images[8:], labels), BitWidths(8, 8), 100.0,
                                  "tiny", lambda m: None, False, get_method("repq"))
    assert info["weight_avg"] == 3 and info["held_out_fp_top1"] == 100.0  # any drop fits: all at 3 bits
    strict, info = widths_for_drop(tiny, tiny_images[:8], (tiny_images[8:], labels), BitWidths(8, 8), 1e-9,
                                   "tiny", lambda m: None, False, get_method("repq"))
    assert info["held_out_drop_bound"] <= 1e-9 or info["weight_avg"] == 8
    assert all(t["held_out_drop_bound"] > 1e-9 for t in info["tried"] if t["step"] > info["tried"][0]["step"]
               and t["weight_avg"] < info["weight_avg"])


def test_cli_avg_bits_exports_a_mixed_map_bit_exact(tmp_path, tiny_calib_dir):
    code, out = _export(tmp_path, tiny_calib_dir, "--avg-bits", "5", "--method", "repq")
    assert code == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    mixed = meta["vitq.recipe"]["mixed_precision"]
    assert mixed["weight_avg"] <= 5 and mixed["activation_avg"] <= 5
    assert len(set(meta["vitq.recipe"]["tensor_bits"].values())) > 2  # the 8-bit stem and at least two widths
    assert meta["vitq.validation"]["exact_images"] == 1.0


@pytest.mark.parametrize("extra, match", [
    (["--avg-bits", "2.5"], "--avg-bits must be between 3 and 8"),
    (["--avg-bits", "5", "--layer-bits", "head=8/8"], "drop --layer-bits"),
    (["--max-drop", "1", "--avg-bits", "5"], "give one"),
    (["--max-drop", "0"], "--max-drop must be a positive"),
    (["--max-drop", "1", "--num-calib", "4"], "only 4 are left"),
])
def test_cli_bad_avg_bits_is_one_line_error(tmp_path, tiny_calib_dir, capsys, extra, match):
    code, out = _export(tmp_path, tiny_calib_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vitq-onnx: error:") and match in err[-1]
    assert not out.exists()


def test_cli_max_drop_needs_labelled_calibration_images(tmp_path, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), 6 * i, np.uint8)).save(folder / f"img{i}.png")
    code, out = _export(tmp_path, folder, "--max-drop", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "--max-drop needs labelled calibration images" in err[-1] and not out.exists()


def test_sensitivities_replaying_the_blocks_before_a_layer_are_those_of_full_passes(tiny, tiny_images, monkeypatch):
    """Blocks before a narrowed tensor return their cached widest outputs: every KL is unchanged."""
    recipe = calibrate(tiny, tiny_images[:8], BitWidths(8, 8), get_method("repq"), "tiny", CalibOptions(progress=False))
    images = torch.from_numpy(tiny_images[:8])
    replayed = measure(tiny, recipe, images, REPQ_SOFTMAX, progress=False)
    monkeypatch.setattr(mixed_precision, "transformer_blocks", lambda model: [])
    full = measure(tiny, recipe, images, REPQ_SOFTMAX, progress=False)
    assert [k.name for k in replayed] == [k.name for k in full] and any(k.module.startswith("blocks.1") for k in full)
    assert all(a.kl == b.kl for a, b in zip(replayed, full)), [(a.name, a.kl, b.kl) for a, b in zip(replayed, full)
                                                              if a.kl != b.kl]
