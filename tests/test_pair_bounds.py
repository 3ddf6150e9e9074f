"""--target-cpu: portable models cannot saturate u8*s8 pairs on CPUs without VNNI (a static bound
over every integer GEMM of the graph), vnni models use full-range s8 operands and stay bit-exact
where the CPU has VNNI/AMX, and are refused elsewhere (fast tier, tiny random ViT)."""

import numpy as np
import onnx
import pytest

from vitq_onnx import cpu, runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.errors import VitqError
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.passes.pair_bounds import INT16_MAX
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import torch_logits

QUIET = CalibOptions(progress=False)


def _build(tiny, images, fp32, bits, method, fmt, target):
    recipe = calibrate(tiny, images[:8], BitWidths.parse(bits), get_method(method), "tiny", QUIET)
    ctx = PassContext(recipe, fmt, target)
    return recipe, run_passes(fp32, pipeline(recipe, fmt), ctx, progress=False), ctx.notes["max_pair_sum"]


@pytest.mark.parametrize("bits, method", [("8/8", "repq"), ("7/8", "repq"), ("8/7", "repq"), ("6/6", "repq-log2"),
                                          ("4/4", "ias-sulq"), ("3/3", "repq-log2"),
                                          ("6/6", "ias")])
@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_portable_pairs_stay_in_int16(tiny, tiny_images, tiny_fp32_onnx, bits, method, fmt):
    _, model, bound = _build(tiny, tiny_images, tiny_fp32_onnx, bits, method, fmt, "portable")
    assert bound <= INT16_MAX  # (the pass raises otherwise: nothing is written)
    if fmt == "ort" and bits != "8/8":  # below 8 bits somewhere: the fast u8*s8 kernels are used
        assert bound > 0


def test_vnni_layout_is_full_range_and_exact_only_with_vnni(tiny, tiny_images, tiny_fp32_onnx):
    recipe, model, bound = _build(tiny, tiny_images, tiny_fp32_onnx, "8/8", "repq", "ort", "vnni")
    assert bound > INT16_MAX  # the bound sees what AVX2 would saturate on
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert weights["blocks.0.mlp.fc1/weight_int8"].dtype == np.int8
    with pytest.raises(VitqError, match="product pairs reach"):  # as a portable model: refused
        _check_portable(model)
    if cpu.has_int8_dot():
        sim = torch_logits(simulate(tiny, recipe), tiny_images)
        assert (sim == runtime.run(runtime.session(model), tiny_images)).all()


def _check_portable(model):
    import onnx_graphsurgeon as gs
    from vitq_onnx.passes.pair_bounds import CheckPairBounds

    CheckPairBounds()(gs.import_onnx(model), PassContext(target_cpu="portable"))


def test_vnni_model_is_refused_at_load_without_vnni(tiny, tiny_images, tiny_fp32_onnx, monkeypatch):
    recipe, model, _ = _build(tiny, tiny_images, tiny_fp32_onnx, "8/8", "repq", "ort", "vnni")
    runtime.set_metadata(model, runtime.META_RECIPE, {"target_cpu": "vnni"})
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)
    with pytest.raises(VitqError, match="for CPUs with VNNI or AMX"):
        runtime.session(model)


def test_classify_example_refuses_a_vnni_model_without_vnni(tiny_fp32_onnx, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "classify.py"
    spec = importlib.util.spec_from_file_location("classify_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = onnx.ModelProto.FromString(tiny_fp32_onnx.SerializeToString())
    runtime.set_metadata(model, runtime.META_PREPROCESS, {"size": 32})
    runtime.set_metadata(model, runtime.META_RECIPE, {"target_cpu": "vnni"})
    onnx.save(model, tmp_path / "m.onnx")
    monkeypatch.setattr(example, "has_int8_dot", lambda: False)
    with pytest.raises(example.Failed, match="for CPUs with VNNI or AMX"):
        example.load(str(tmp_path / "m.onnx"))
    monkeypatch.setattr(example, "has_int8_dot", lambda: True)
    assert example.load(str(tmp_path / "m.onnx"))[1] == {"size": 32}


@pytest.mark.slow
@pytest.mark.skipif(not cpu.has_int8_dot(), reason="a vnni model runs exactly only on a CPU with VNNI/AMX")
def test_deit_w8a8_vnni_is_bit_exact_here(deit, calib_images, val_images, fp32_onnx):
    recipe = calibrate(deit, calib_images, BitWidths(8, 8), get_method("repq"), "deit_tiny_patch16_224", QUIET)
    ctx = PassContext(recipe, "ort", "vnni")
    model = run_passes(fp32_onnx, pipeline(recipe, "ort"), ctx, progress=False)
    assert ctx.notes["max_pair_sum"] > INT16_MAX
    images = np.concatenate([calib_images, val_images])
    assert (torch_logits(simulate(deit, recipe), images) == runtime.run(runtime.session(model), images)).all()
