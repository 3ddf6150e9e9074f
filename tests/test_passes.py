"""Each pass on the real DeiT-Ti graph: names, lossless fold, QDQ grids, log2 shifts, recipe checks."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.quantizers import log2 as L
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.errors import VitqError
from vitq_onnx.passes import PassContext, pipeline, run_passes
from vitq_onnx.passes.fold_reparam import FoldReparam
from vitq_onnx.passes.name_nodes import NameNodes, scope_name
from vitq_onnx.recipe import Recipe, WeightQuant
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import compare_logits, torch_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repq_w4a4(deit, calib_images) -> Recipe:
    return calibrate(deit, calib_images, BitWidths(4, 4), get_method("repq"), "deit_tiny_patch16_224",
                     CalibOptions(progress=False))


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


def test_scope_names_become_module_paths():
    assert scope_name("/blocks/blocks.3/attn/qkv/MatMul") == "blocks.3.attn.qkv/MatMul"
    assert scope_name("/layers/layers.1/blocks/blocks.0/mlp/fc1/MatMul") == "layers.1.blocks.0.mlp.fc1/MatMul"
    assert scope_name("/head/Gemm") == "head/Gemm"
    assert scope_name("Constant_12") == "Constant_12"


def test_name_nodes_gives_every_linear_and_attention_a_canonical_node(deit, fp32_onnx):
    graph = NameNodes()(gs.import_onnx(fp32_onnx), PassContext())
    nodes = {n.name: n for n in graph.nodes}
    linears = [name for name, m in deit.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 12 + 1
    for name in linears:
        node = nodes[f"{name}/MatMul"]
        w = node.inputs[1]
        assert isinstance(w, gs.Constant)
        assert w.values.shape == tuple(deit.get_submodule(name).weight.shape[::-1])
    for i in range(12):
        assert nodes[f"blocks.{i}.attn/matmul_qk"].op == "MatMul"
        assert nodes[f"blocks.{i}.attn/matmul_av"].inputs[0].inputs[0].op == "Softmax"
    assert "patch_embed.proj/Conv" in nodes and not any(n.op == "Gemm" for n in graph.nodes)


def test_fold_reparam_is_lossless_and_not_a_no_op(fp32_onnx, repq_w4a4, val_images):
    assert len(repq_w4a4.reparams) == 24
    folded = run_passes(fp32_onnx, [NameNodes(), FoldReparam()], PassContext(repq_w4a4), progress=False)
    before = runtime.run(runtime.session(fp32_onnx), val_images)
    after = runtime.run(runtime.session(folded), val_images)
    assert np.abs(before - after).max() <= 1e-3
    gammas = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in fp32_onnx.graph.initializer}
    assert not np.allclose(gammas["blocks.0.norm1.weight"], original["blocks.0.norm1.weight"])


def test_w4a4_graph_equals_simulation_bit_for_bit_with_per_tensor_qdq_only(deit, fp32_onnx, repq_w4a4, val_images, tmp_path):
    model = run_passes(fp32_onnx, pipeline(repq_w4a4), PassContext(repq_w4a4), tmp_path, progress=False)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["00_fp32.onnx", "01_name_nodes.onnx", "02_fold_reparam.onnx", "03_quantize_weights.onnx",
                     "04_round_params.onnx", "05_insert_qdq.onnx", "06_log2_softmax.onnx", "07_hoist_quantize.onnx",
                     "08_lower_integer.onnx", "09_store_float16.onnx", "10_unfused_norm.onnx",
                     "11_check_pair_bounds.onnx", "12_check_float_matmuls.onnx", "13_check_model.onnx"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("_q")]
    assert len(quantize) == 12 * 7 + 2  # 4 Linear + q, k, v per block (softmax: log2 codes); patch embed, head
    assert all(inits[n.input[1]].size == 1 for n in quantize)
    assert "blocks.3.attn.qkv/input_q" in {n.name for n in quantize}
    # 4-bit codes stay on the 4-bit grid inside their 8-bit containers; k and v (right-hand
    # activation operands) are signed so onnxruntime picks u8*s8 kernels
    codes = ["blocks.5.mlp.fc2/input_uint4", "blocks.5.attn/q_uint4", "blocks.5.attn/k_int4", "blocks.5.attn/v_int4"]
    fc2, q, k, v = runtime.session(_with_outputs(model, codes)).run(codes, {"image": val_images})
    assert fc2.dtype == q.dtype == np.uint8 and max(fc2.max(), q.max()) <= 15
    assert k.dtype == v.dtype == np.int8 and min(k.min(), v.min()) >= -8 and max(k.max(), v.max()) <= 7
    report = compare_logits(torch_logits(simulate(deit, repq_w4a4), val_images),
                            runtime.run(runtime.session(model), val_images))
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0  # bit-exact


def test_log2_softmax_is_integer_shift_arithmetic(fp32_onnx, repq_w4a4, val_images):
    model = run_passes(fp32_onnx, pipeline(repq_w4a4), PassContext(repq_w4a4), progress=False)
    ops = [n.op_type for n in model.graph.node]
    assert "Pow" not in ops and "Softmax" not in ops and ops.count("LogSoftmax") == 12
    names = ["blocks.2.attn/attn_log2_codes", "blocks.2.attn/attn_shifted", "blocks.2.attn/attn_odd"]
    codes, shifted, odd = runtime.session(_with_outputs(model, names)).run(names, {"image": val_images})
    assert codes.dtype == shifted.dtype == odd.dtype == np.uint8 and codes.max() <= L.log2_zero_code(4)
    assert len(np.unique(codes)) == L.log2_zero_code(4) + 1  # every code occurs on real images
    ref_shifted, ref_odd = L.log2_parts(torch.from_numpy(codes.astype(np.int64)), 4)
    np.testing.assert_array_equal(shifted, ref_shifted.numpy())
    np.testing.assert_array_equal(odd, ref_odd.numpy())
    assert shifted.max() == 2 ** L.log2_max_exponent(4) and (odd[codes % 2 == 0] == 0).all()


def test_every_matmul_is_lowered_to_integer_kernels(fp32_onnx, repq_w4a4, tmp_path):
    model = run_passes(fp32_onnx, pipeline(repq_w4a4), PassContext(repq_w4a4), progress=False)
    ops = [n.op_type for n in model.graph.node]
    # 4 Linears + q.k per block, the head, the patch embedding (a GEMM over patches) and the log2
    # attn@v as two integer GEMMs per block
    assert ops.count("MatMulIntegerToFloat") == 12 * 5 + 1 + 1 + 2 * 12
    assert not {"MatMul", "Gemm", "Conv", "ConvInteger"} & set(ops)
    # and onnxruntime keeps them integer after its own graph optimizations
    optimized = tmp_path / "optimized.onnx"
    runtime.session(model, optimized_path=optimized)
    opt_ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert not {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv"} & set(opt_ops)
    assert opt_ops.count("MatMulIntegerToFloat") == 12 * 7 + 2


def test_recipe_roundtrip_and_mismatch_is_a_clear_error(fp32_onnx, repq_w4a4, tmp_path):
    repq_w4a4.save(tmp_path / "r.json")
    loaded = Recipe.load(tmp_path / "r.json")
    assert loaded.activations.keys() == repq_w4a4.activations.keys()
    key = "blocks.0.attn.qkv/MatMul:1"
    np.testing.assert_array_equal(loaded.weights[key].scale, repq_w4a4.weights[key].scale)
    bad = Recipe("x", "basic", 8, 8, weights={"blocks.99.attn.qkv/MatMul:1": WeightQuant(8, np.ones(3, np.float32))})
    with pytest.raises(VitqError, match="does not fit"):
        run_passes(fp32_onnx, pipeline(bad), PassContext(bad), progress=False)


def test_basic_method_lowers_uniform_attention_too(deit, fp32_onnx, calib_images, val_images):
    recipe = calibrate(deit, calib_images, BitWidths(4, 4), get_method("basic"), "deit_tiny_patch16_224",
                       CalibOptions(progress=False))
    assert not recipe.reparams and all(a.kind == "uniform" for a in recipe.activations.values())
    model = run_passes(fp32_onnx, pipeline(recipe), PassContext(recipe), progress=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 12 * 6 + 2 and "MatMul" not in ops
    report = compare_logits(torch_logits(simulate(deit, recipe), val_images),
                            runtime.run(runtime.session(model), val_images))
    assert report["max_abs_logit_error"] == 0.0


def test_qdq_format_is_standard_packed_int4_and_bit_exact(deit, fp32_onnx, repq_w4a4, val_images):
    model = run_passes(fp32_onnx, pipeline(repq_w4a4, "qdq"), PassContext(repq_w4a4, "qdq"), progress=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no onnxruntime contrib ops
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4 and len(i.dims) >= 2]
    assert len(int4) == 4 * 12 + 1 + 1  # Linear weights, head and the patch-embedding Conv
    assert all(len(i.raw_data) == (np.prod(i.dims) + 1) // 2 for i in int4)  # two codes per byte
    q_types = {i.data_type for i in model.graph.initializer if i.name.endswith("input_zero_point")}
    assert onnx.TensorProto.UINT4 in q_types
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BitShift") == 12 and "Exp" not in ops and "Pow" not in ops  # log2 shifts as shifts
    report = compare_logits(torch_logits(simulate(deit, repq_w4a4), val_images),
                            runtime.run(runtime.session(model), val_images))
    assert report["max_abs_logit_error"] == 0.0  # onnxruntime's float GEMMs sum integers exactly


def test_parameters_are_stored_in_fewer_bytes_with_the_simulated_values(fp32_onnx, repq_w4a4):
    storage = repq_w4a4.param_storage
    assert storage["pos_embed"] == "int8" and storage["blocks.0.norm1.weight"] == "float16"
    assert "blocks.0.attn.qkv.weight" not in storage  # quantized weights are not parameters here
    model = run_passes(fp32_onnx, pipeline(repq_w4a4), PassContext(repq_w4a4), progress=False)
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["pos_embed_int8"].data_type == onnx.TensorProto.INT8
    assert inits["blocks.0.mlp.fc1.bias_float16"].data_type == onnx.TensorProto.FLOAT16
    big_float32 = [i.name for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64]
    assert big_float32 == ["pos_embed_scale"]  # only the int8 embedding's per-channel scale


def test_reconstructed_deit_recipe_stays_bit_exact_in_both_formats(deit, fp32_onnx, calib_images, val_images):
    from vitq_onnx.calibration.methods import Method
    from vitq_onnx.calibration.reconstruct import BlockReconstruction

    method = Method("recon-short", "", get_method("repq").stages + (BlockReconstruction(iters=3, batch_size=4),))
    recipe = calibrate(deit, calib_images, BitWidths(4, 4), method, "deit_tiny_patch16_224", CalibOptions(progress=False))
    assert recipe.info["reconstruction"]["iters"] == [3] * 12
    assert recipe.weights["blocks.11.mlp.fc2/MatMul:1"].codes is not None
    sim = torch_logits(simulate(deit, recipe), val_images)
    for fmt in ("ort", "qdq"):
        model = run_passes(fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
        assert compare_logits(sim, runtime.run(runtime.session(model), val_images))["max_abs_logit_error"] == 0.0


@pytest.mark.parametrize("bits", [3, 4])
def test_sulq_graph_is_integer_shifts_and_bit_exact(deit, fp32_onnx, calib_images, val_images, bits):
    from vitq_onnx.codes import sulq as S

    recipe = calibrate(deit, calib_images, BitWidths(bits, bits), get_method("ias-sulq"), "deit_tiny_patch16_224",
                       CalibOptions(progress=False))
    sulq = {k: q for k, q in recipe.activations.items() if q.kind == "sulq"}
    assert len(sulq) == 12 and all(S.eta_shift(float(q.params["eta"])) is not None for q in sulq.values())
    parts = sum(len(S.sulq_part_shifts(q.params["lo"], q.params["delta"], q.params["eta"], bits))
                for q in sulq.values())
    sim = torch_logits(simulate(deit, recipe), val_images)
    for fmt in ("ort", "qdq"):
        model = run_passes(fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
        ops = [n.op_type for n in model.graph.node]
        assert "Exp" not in ops and "Pow" not in ops and ops.count("Softmax") == 12
        assert ops.count("BitShift") == (parts if fmt == "qdq" else 0)
        assert compare_logits(sim, runtime.run(runtime.session(model), val_images))["max_abs_logit_error"] == 0.0
    codes_name = "blocks.5.attn/attn_sulq_codes"
    (codes,) = runtime.session(_with_outputs(model, [codes_name])).run([codes_name], {"image": val_images})
    assert codes.dtype == np.uint8 and codes.max() <= 2**bits - 1 and len(np.unique(codes)) >= 2**bits - 2


def test_w8a8_quantizes_each_qkv_once_and_stays_bit_exact_in_both_formats(deit, fp32_onnx, calib_images, val_images):
    """hoist_quantize's riskiest rewrite, on the real graph: q, k, v of each block come out of one
    per-axis QuantizeLinear (the 1/sqrt(d) Mul folded into q's scale), and every logit is the
    simulation's."""
    recipe = calibrate(deit, calib_images, BitWidths(8, 8), get_method("repq"), "deit_tiny_patch16_224",
                       CalibOptions(progress=False))
    sim = torch_logits(simulate(deit, recipe), val_images)
    for fmt in ("ort", "qdq"):
        model = run_passes(fp32_onnx, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
        merged = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("attn/q_k_v_q")]
        assert len(merged) == 12
        assert not any(n.op_type == "Mul" and n.name.endswith("attn/Mul") for n in model.graph.node)
        assert compare_logits(sim, runtime.run(runtime.session(model), val_images))["max_abs_logit_error"] == 0.0
