"""Fast tier: each calibration stage alone, and the block-reconstruction engine, on a tiny ViT."""

import copy
import dataclasses
import os
import time

import numpy as np
import pytest
import torch

from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import REPQ_SOFTMAX, Method, sulq
from vitq_onnx.calibration.quant_points import instrument
from vitq_onnx.calibration.reconstruct import (BlockReconstruction, OutputTuning, augmented, block_outputs,
                                               fisher_weights, quantized_point_grads, transformer_blocks)
from vitq_onnx.progress import StageTimes
from vitq_onnx.calibration.stages import ChannelwiseReparam, FitActivations, FitWeights, quantize_as_recipe
from vitq_onnx.calibration.state import CalibOptions, CalibState
from vitq_onnx.errors import VitqError
from vitq_onnx.recipe import Recipe
from vitq_onnx.calibration.simulation import simulate

QUIET = CalibOptions(progress=False)


def _state(model, images, bits=BitWidths(4, 4), options=QUIET) -> CalibState:
    work = copy.deepcopy(model)
    return CalibState(model, work, instrument(work), torch.from_numpy(images), bits,
                      Recipe("tiny", "test", bits.w, bits.a), options)


def test_channelwise_reparam_alone_is_lossless(tiny, tiny_images):
    state = _state(tiny, tiny_images)
    ChannelwiseReparam().run(state)
    assert len(state.recipe.reparams) == 4  # norm1 -> qkv and norm2 -> fc1 in each of 2 blocks
    assert {k for k in state.recipe.activations} == {f"blocks.{i}.{m}/MatMul:0" for i in (0, 1)
                                                     for m in ("attn.qkv", "mlp.fc1")}
    with torch.no_grad():
        x = torch.from_numpy(tiny_images)
        assert (state.model(x) - tiny(x)).abs().max() < 1e-4  # the fold changes no output
        assert not torch.equal(state.model.blocks[0].norm1.weight, tiny.blocks[0].norm1.weight)


def test_fit_weights_alone_puts_every_weight_on_its_grid(tiny, tiny_images):
    state = _state(tiny, tiny_images, BitWidths.parse("4/4", ["blocks.1.mlp.fc2=3/3"]))
    FitWeights().run(state)
    assert len(state.recipe.weights) == 4 * 2 + 2  # Linears, head, patch embedding
    for key, mod in state.inst.weights.items():
        q = state.recipe.weights[key]
        assert q.bits == (3 if key.startswith("blocks.1.mlp.fc2") else 4)
        scale = torch.from_numpy(q.scale).reshape(-1, *([1] * (mod.weight.dim() - 1)))
        codes = mod.weight / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 2 ** (q.bits - 1)


def test_fit_activations_alone_fits_every_point_with_the_methods_kinds(tiny, tiny_images):
    state = _state(tiny, tiny_images)
    FitWeights().run(state)
    FitActivations(REPQ_SOFTMAX).run(state)
    acts = state.recipe.activations
    assert set(acts) == set(state.inst.points)
    assert {k for k, q in acts.items() if q.kind == "log2"} == {f"blocks.{i}.attn/matmul_av:0" for i in (0, 1)}
    assert acts["patch_embed.proj/Conv:0"].bits == 8 and acts["blocks.0.mlp.fc2/MatMul:0"].bits == 4
    linears = {k.rpartition(":")[0] for k in state.inst.weights if "/MatMul" in k}
    assert set(state.recipe.bias_corrections) == linears  # bias correction of every Linear


def _recon(iters=40, **kw):
    from vitq_onnx.calibration.methods import get_method

    stage = BlockReconstruction(iters=iters, batch_size=8, drop=0.5, head=True, **kw)
    return Method("test-recon", "", get_method("repq").stages + (stage,))


def test_reconstruction_lowers_every_blocks_error_and_stores_trained_codes(tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(), "tiny", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["units"] == ["blocks.0", "blocks.1", "head"] and rec["iters"] == [40, 40, 40]
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec
    inside = [k for k in recipe.weights if k.startswith("blocks.")]
    assert all(recipe.weights[k].codes is not None for k in inside)
    assert recipe.weights["patch_embed.proj/Conv:1"].codes is None  # not trained: rounded by the passes
    assert recipe.weights["head/MatMul:1"].codes is not None  # the head unit
    assert set(recipe.bias_corrections) >= {k.rpartition(":")[0] for k in inside}


def test_quantized_weights_learn_at_a_rate_that_follows_their_width(tiny, tiny_images):
    from vitq_onnx.calibration.reconstruct import _Trainable, _units

    bits = BitWidths.parse("4/4", ["blocks.0.mlp.fc2=3/3", "blocks.0.attn.qkv=6/6"])
    state = _state(tiny, tiny_images, bits)
    FitWeights().run(state)
    FitActivations(REPQ_SOFTMAX).run(state)
    block = _units(state, head=False)[0]
    trainable = _Trainable(state, block, ("weights",), 0.0, quantized=True, lr_width=True)
    factors = {k.partition("/")[0]: trainable.lr_factor[trainable.w[k][0]] for k in trainable.layers}
    assert factors == {"blocks.0.attn.qkv": 0.25, "blocks.0.attn.proj": 1.0, "blocks.0.mlp.fc1": 1.0,
                       "blocks.0.mlp.fc2": 1.0}  # wider than 4 bits: slower; narrower: the same rate
    lr = {id(p): g["lr"] for g in trainable.param_groups({"weights": 3e-4}) for p in g["params"]}
    assert {k.partition("/")[0]: lr[id(trainable.w[k][0])] for k in trainable.layers} == {
        k: 3e-4 * f for k, f in factors.items()}
    assert _Trainable(state, block, ("weights",), 0.0, quantized=False, lr_width=True).lr_factor == {}
    assert _Trainable(state, block, ("weights",), 0.0, quantized=True).lr_factor == {}


def test_units_whose_weights_are_all_wide_train_their_own_iterations(tiny, tiny_images):
    """``wide_iters`` where every weight of the block is wider than 4 bits, ``iters`` elsewhere."""
    bits = BitWidths.parse("6/6", ["blocks.1.mlp.fc2=4/6"])
    recipe = calibrate(tiny, tiny_images, bits, _recon(iters=6, wide_iters=2), "tiny", QUIET)
    assert recipe.info["reconstruction"]["iters"] == [2, 6, 2]  # blocks.0, blocks.1, the head
    recipe = calibrate(tiny, tiny_images, bits, _recon(iters=6), "tiny", QUIET)
    assert recipe.info["reconstruction"]["iters"] == [6, 6, 6]


def test_reconstruction_is_deterministic_for_a_seed(tiny, tiny_images):
    runs = [calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=10), "tiny", CalibOptions(seed=s, progress=False))
            for s in (3, 3, 4)]
    key = "blocks.1.mlp.fc1/MatMul:1"
    np.testing.assert_array_equal(runs[0].weights[key].codes, runs[1].weights[key].codes)
    assert runs[0].info["reconstruction"] == runs[1].info["reconstruction"]
    assert runs[0].info["reconstruction"]["loss_after"] != runs[2].info["reconstruction"]["loss_after"]


def test_a_deadline_bounds_every_optimizing_stage_together(tiny, tiny_images):
    """Two reconstruction stages (as ias has) of 10^5 and 3 x 10^5 iterations per unit under a
    4-second deadline: both run, each with its share in proportion to its iterations, and
    together they end near the deadline (loose bounds: CI machines are busy)."""
    from vitq_onnx.calibration.methods import get_method

    class StartClock:  # the deadline counted from here, after the fits (whose time varies with the machine)
        name = "start_clock"

        def describe(self, state):
            return "4 s from now"

        def run(self, state):
            state.options = dataclasses.replace(state.options, deadline=time.time() + 4.0)

    first = BlockReconstruction(iters=100000, batch_size=8, quantized_weights=False, fisher=False)
    second = BlockReconstruction(iters=300000, batch_size=8)
    method = Method("two-recon", "", get_method("repq").stages + (StartClock(), first, second))
    times = StageTimes()
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), method, "tiny", CalibOptions(progress=False, times=times))
    elapsed = sum(s for name, s in times.items() if name.endswith("block_reconstruction"))
    stage1, stage3 = (recipe.info[k]["iters"] for k in ("float_weight_reconstruction", "reconstruction"))
    assert 2.0 < elapsed < 8.0 and min(stage1 + stage3) >= 1  # (unbounded, 10^5 steps per block take minutes)
    assert sum(stage1) < sum(stage3) < 300000 * len(stage3)  # the second stage had three quarters


def test_two_blocks_train_as_one_unit_to_the_second_ones_output(tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=20, span=2), "tiny", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["units"] == ["blocks.1", "head"], rec  # blocks.0 and blocks.1 together, then the head
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec
    assert all(recipe.weights[k].codes is not None for k in recipe.weights if k.startswith("blocks.0."))


def test_augmented_reconstruction_trains_on_mirrored_and_shifted_copies(tiny, tiny_images):
    x = torch.from_numpy(tiny_images[:3])
    copies = augmented(x, ("flip", "shift"))
    assert torch.equal(copies[:3], x) and torch.equal(copies[3:6], x.flip(-1))
    assert torch.equal(copies[6:, :, 8:, 8:], x[:, :, :-8, :-8])  # half a patch down and right
    assert torch.equal(copies[6:, :, 0, 8:], x[:, :, 8, :-8])  # the top edge reflected
    with pytest.raises(VitqError, match="unknown augmentation 'rotate'"):
        augmented(x, ("rotate",))
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=5, augment=("flip",)), "tiny", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["images"] == 2 * len(tiny_images) and rec["augment"] == ["flip"]


def test_output_tuning_lowers_the_kl_of_the_simulated_recipe(tiny, tiny_images):
    """After block reconstruction, tuning the scales and biases against the float logits lowers
    their KL divergence on the calibration images, in training and in the recipe's simulation."""
    base = _recon(iters=10).stages
    x = torch.from_numpy(tiny_images)
    fp = torch.log_softmax(tiny(x), -1).detach()
    kls = []
    for stages in (base, base + (OutputTuning(iters=30, batch_size=8, lr_scales=1e-2),)):
        recipe = calibrate(tiny, tiny_images, BitWidths(3, 3), Method("tuned", "", stages), "tiny", QUIET)
        with torch.no_grad():
            q = torch.log_softmax(simulate(tiny, recipe)(x), -1)
        kls.append(torch.nn.functional.kl_div(q, fp, log_target=True, reduction="batchmean").item())
    tuned = recipe.info["output_tuning"]
    assert tuned["kl_after"] < tuned["kl_before"] and kls[1] < kls[0], (tuned, kls)


def test_fisher_gradients_are_those_of_the_float_models_own_prediction(tiny, tiny_images):
    """Against autograd on one image at a time: g is the gradient of the cross-entropy of the float
    model's prediction at each block's output, and the loss weights are 1 + g^2 / mean(g^2); the
    targets are those of the pass without gradients, bit for bit."""
    x = torch.from_numpy(tiny_images[:5])
    targets, grads = block_outputs(copy.deepcopy(tiny), ["blocks.0", "blocks.1"], x, fisher=True)
    plain, none = block_outputs(copy.deepcopy(tiny), ["blocks.0", "blocks.1"], x)
    assert none == {} and plain.keys() == targets.keys() and all(torch.equal(plain[k], targets[k]) for k in plain)
    for name in ("blocks.0", "blocks.1"):
        each = []
        for image in x:
            out = {}
            handle = tiny.get_submodule(name).register_forward_hook(lambda _m, _a, o: out.setdefault("y", o))
            logits = tiny(image[None])
            handle.remove()
            each.append(torch.autograd.grad(torch.nn.functional.cross_entropy(logits, logits.argmax(1)), out["y"])[0])
        g = torch.cat(each)
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-8)
        weights = fisher_weights(grads[name])
        assert weights.min() >= 1
        torch.testing.assert_close(weights, 1 + g.pow(2) / g.pow(2).mean(), rtol=1e-4, atol=1e-5)
    softer = block_outputs(copy.deepcopy(tiny), ["blocks.0"], x, fisher=True, temperature=4.0)[1]["blocks.0"]
    out = {}
    handle = tiny.get_submodule("blocks.0").register_forward_hook(lambda _m, _a, o: out.setdefault("y", o))
    logits = tiny(x)
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits / 4.0, logits.argmax(1), reduction="sum")
    torch.testing.assert_close(softer, torch.autograd.grad(loss, out["y"])[0], rtol=1e-4, atol=1e-8)


def test_block_caches_past_their_bound_go_to_disk_and_read_back_bit_for_bit(tiny, tiny_images, monkeypatch):
    """Past CACHE_BYTES the outputs and Fisher weights live in temporary files (a 518-px ViT-S's:
    6.8 GB), one block read back at a time: the same tensors as in memory; a popped block's file
    is gone. Past GRAD_PASS_BYTES the Fisher pass takes fewer images at once, to the same values."""
    from vitq_onnx.calibration import reconstruct

    x, names = torch.from_numpy(tiny_images[:5]), ["blocks.0", "blocks.1"]
    in_memory = block_outputs(copy.deepcopy(tiny), names, x, fisher=True)
    monkeypatch.setattr(reconstruct, "CACHE_BYTES", 0)
    on_disk = block_outputs(copy.deepcopy(tiny), names, x, fisher=True)
    assert all(c.folder is not None for c in on_disk) and all(c.folder is None for c in in_memory)
    for memory, disk in zip(in_memory, on_disk):
        assert set(memory) == set(disk)
        for name in memory:
            assert torch.equal(memory[name], disk[name])
    folder = on_disk[0].folder.name
    on_disk[0].pop("blocks.0")
    assert "blocks.0" not in on_disk[0] and sorted(os.listdir(folder)) == ["blocks.1", "head"]
    assert reconstruct.grad_chunk(copy.deepcopy(tiny), x[:1]) == reconstruct.CHUNK
    monkeypatch.setattr(reconstruct, "GRAD_PASS_BYTES", 1)
    assert reconstruct.grad_chunk(copy.deepcopy(tiny), x[:1]) == 1
    one_by_one = block_outputs(copy.deepcopy(tiny), names, x, fisher=True)
    for memory, single in zip(in_memory, one_by_one):
        for name in memory:
            torch.testing.assert_close(single[name], memory[name], rtol=1e-4, atol=1e-5)


def test_fisher_weighted_reconstruction_lowers_its_loss(tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=30, fisher=True), "tiny", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["loss"] == "fisher"
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec


def test_rank_one_fisher_term_starts_at_its_share_and_lowers_the_loss(tiny, tiny_images):
    """``lowrank=1``: each unit's first loss is twice its diagonal term (the rank-one term starts at
    the diagonal's value); training lowers it; it is recorded; without the Fisher pass it is a
    clear error."""
    plain = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=0, fisher=True), "tiny", QUIET)
    both = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=30, fisher=True, lowrank=1.0), "tiny", QUIET)
    rec, first = both.info["reconstruction"], plain.info["reconstruction"]
    assert rec["lowrank"] == 1.0 and "lowrank" not in first
    torch.testing.assert_close(torch.tensor(rec["loss_before"][0]), 2 * torch.tensor(first["loss_before"][0]),
                               rtol=2e-3, atol=0)  # (rounded to 6 decimals)
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec
    with pytest.raises(VitqError, match="needs fisher"):
        calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=1, fisher=False, lowrank=1.0), "tiny", QUIET)
    with pytest.raises(VitqError, match="unknown fisher_at 'both'"):
        calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=1, fisher_at="both"), "tiny", QUIET)


def test_fisher_at_the_quantized_point_is_the_float_fisher_when_given_the_float_output(tiny, tiny_images):
    """``quantized_point_grads`` puts a given output in place of a block's: given the float output
    itself it is the float pass's gradient; given another, another."""
    x, name = torch.from_numpy(tiny_images[:4]), "blocks.0"
    model = copy.deepcopy(tiny)
    targets, grads = block_outputs(model, [name], x, fisher=True)
    for p in model.parameters():
        p.requires_grad_(False)
    labels = targets["head"].argmax(1)
    torch.testing.assert_close(quantized_point_grads(model, name, targets[name], x, labels), grads[name])
    moved = quantized_point_grads(model, name, targets[name] * 1.5, x, labels)
    assert not torch.allclose(moved, grads[name])
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=10, fisher_at="quantized"), "tiny", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["fisher_at"] == "quantized" and rec["loss"] == "fisher"
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec


def test_transformer_blocks_are_found_in_forward_order(tiny):
    assert [n for n, _ in transformer_blocks(tiny)] == ["blocks.0", "blocks.1"]


def test_unknown_layer_pattern_and_device_are_clear_errors(tiny, tiny_images):
    from vitq_onnx.calibration.methods import get_method

    with pytest.raises(VitqError, match="'blocks.7.*' matches no quantized layer"):
        calibrate(tiny, tiny_images, BitWidths.parse("4/4", ["blocks.7.*=8/8"]), get_method("repq"), "tiny", QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(VitqError, match="no CUDA GPU"):
            calibrate(tiny, tiny_images, BitWidths(4, 4), get_method("repq"), "tiny",
                      CalibOptions(device="cuda", progress=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reconstruction_on_gpu_gives_a_cpu_recipe(tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=5), "tiny",
                       CalibOptions(device="cuda", progress=False))
    assert all(isinstance(q.scale, np.ndarray) for q in recipe.weights.values())


def test_progress_off_a_terminal_is_a_few_lines_with_eta(capsys, monkeypatch):
    from vitq_onnx import progress

    bar = progress.Progress(1000, "stage", enabled=True)
    for _ in range(1000):
        bar.update(1, loss=0.5)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage: 1000/1000 in") and "loss 0.5" in lines[0]
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    bar = progress.Progress(3, "stage", enabled=True)
    bar.update(1)
    assert "stage: 1/3, ETA" in capsys.readouterr().err


def test_reconstruction_of_a_shifted_window_swin_stays_bit_exact(tiny_images):
    """Swin: blocks in several stages with patch merging between them, masked (exactly zero)
    attention in the shifted windows, and the head unit."""
    from timm.models.swin_transformer import SwinTransformer

    from vitq_onnx import runtime
    from vitq_onnx.fp32 import export_fp32
    from vitq_onnx.passes import PassContext, pipeline, run_passes
    from vitq_onnx.calibration.simulation import simulate
    from vitq_onnx.validate import compare_logits, torch_logits

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2), num_classes=10).eval()
    recipe = calibrate(swin, tiny_images[:8], BitWidths(4, 4), _recon(iters=5), "swin", QUIET)
    rec = recipe.info["reconstruction"]
    assert rec["units"] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1", "head"]
    assert all(np.isfinite(rec["loss_after"]))
    fp32 = export_fp32(swin, 32)
    stored = {i.name for i in fp32.graph.initializer}
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    model = run_passes(fp32, pipeline(recipe), PassContext(recipe), progress=False)
    report = compare_logits(torch_logits(simulate(swin, recipe), tiny_images[8:]),
                            runtime.run(runtime.session(model), tiny_images[8:]))
    assert report["max_abs_logit_error"] == 0.0


def test_float_weight_reconstruction_carries_its_weights_into_the_recipe(tiny, tiny_images):
    """I&S-ViT's first stage trains float weights; the recipe must then carry the codes of those
    weights (the graph's are the original ones), and the simulation compute what calibration did."""
    state = _state(tiny, tiny_images[:8])
    ChannelwiseReparam().run(state)
    FitActivations(sulq, weights=False).run(state)
    assert not state.recipe.weights  # weights still float
    BlockReconstruction(iters=20, learn=("weights", "biases"), quantized_weights=False).run(state)
    trained = {k for k in state.inst.weights if k.startswith("blocks.")}
    assert state.retrained == trained and "float_weight_reconstruction" in state.recipe.info
    losses = state.recipe.info["float_weight_reconstruction"]
    assert losses["loss_after"][-1] < losses["loss_before"][-1]
    FitWeights().run(state)
    assert {k for k, q in state.recipe.weights.items() if q.codes is not None} == trained
    state.inst.set_action(None)
    x = torch.from_numpy(tiny_images[8:])
    for point in state.inst.points.values():
        quantize_as_recipe(state, point)
    with torch.no_grad():
        calibrated, simulated = state.model(x), simulate(tiny, state.recipe)(x)
    assert (calibrated - simulated).abs().max() < 0.05 * calibrated.abs().max()


def test_adaround_codes_stay_next_to_the_float_weight_and_lower_every_blocks_error(tiny, tiny_images):
    """Learned rounding: every trained code is the float weight's floor or ceiling on the grid it
    started from, the block loss falls, and the soft weight starts at the float weight."""
    from vitq_onnx.calibration.quantizers import adaround

    w, scale = torch.randn(8, 16), torch.rand(8) * 0.1 + 0.05
    base, alpha = adaround.start(w, scale)
    torch.testing.assert_close(adaround.soft_weight(base, alpha, scale, 8), w, atol=2e-5, rtol=0)
    assert adaround.beta_at(0, 10) is None and adaround.beta_at(2, 10) == 20.0 and adaround.beta_at(10, 10) == 2.0
    assert adaround.penalty(torch.full((3,), 50.0), 2.0).item() == 0.0  # gates at 1: nothing to pay

    stages = _recon(iters=30, rounding="adaround").stages
    state = _state(tiny, tiny_images)
    for stage in stages[:-1]:
        stage.run(state)
    fitted = {k: (state.fp_weights[k], torch.from_numpy(q.scale)) for k, q in state.recipe.weights.items()
              if k.startswith("blocks.")}
    stages[-1].run(state)
    rec = state.recipe.info["reconstruction"]
    assert rec["rounding"] == "adaround"
    assert all(after < before for before, after in zip(rec["loss_before"], rec["loss_after"])), rec
    for key, (fp, scale) in fitted.items():
        floor = torch.floor(fp / scale.reshape(-1, 1)).clamp(-8, 7)
        codes = torch.from_numpy(state.recipe.weights[key].codes).float()
        assert ((codes - floor) >= 0).all() and ((codes - floor) <= 1).all(), key
    with pytest.raises(VitqError, match="unknown rounding 'adarond': use ste, adaround"):
        calibrate(tiny, tiny_images, BitWidths(4, 4), _recon(iters=1, rounding="adarond"), "tiny", QUIET)
