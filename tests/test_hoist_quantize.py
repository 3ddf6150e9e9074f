"""hoist_quantize: QuantizeLinear and Clip move above attention's split, squeezes, transposes and the
1/sqrt(d) Mul, and the three quantizers of an unclipped q/k/v merge into one; every code is the same."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from vitq_onnx import runtime
from vitq_onnx.passes import PassContext
from vitq_onnx.passes.base import to_model
from vitq_onnx.passes.hoist_quantize import HoistQuantize
from vitq_onnx.passes.common import code_range

HEADS, DIM = 2, 8


SCALES = {"q": 2.0**-5, "k": 0.05, "v": 2.0**-6}  # powers of two for q and v: exact rounding ties below


def _attention_inputs(clip: bool, q_factor: float, mixed_codes: bool = False) -> gs.Graph:
    """qkv [1, 7, 3*H*D] -> Reshape, Transpose, Split, Squeeze; q * q_factor; k transposed; each
    (optionally clipped to 4 bits) quantized by its own scale: timm's attention, as insert_qdq leaves it."""
    x = gs.Variable("qkv", np.float32, [1, 7, 3 * HEADS * DIM])
    nodes, outputs = [], []

    def var(name):
        return gs.Variable(name, np.float32)

    shaped, moved = var("shaped"), var("moved")
    nodes.append(gs.Node("Reshape", "attn/Reshape", inputs=[x, gs.Constant("shape", np.array([1, 7, 3, HEADS, DIM]))],
                         outputs=[shaped]))
    nodes.append(gs.Node("Transpose", "attn/Transpose", attrs={"perm": [2, 0, 3, 1, 4]}, inputs=[shaped],
                         outputs=[moved]))
    parts = [var(f"part{i}") for i in range(3)]
    nodes.append(gs.Node("Split", "attn/Split", attrs={"axis": 0}, inputs=[moved, gs.Constant("sizes", np.ones(3, np.int64))],
                         outputs=parts))
    for i, (name, zero, dtype) in enumerate((("q", 128, np.uint8), ("k", 0, np.int8), ("v", 0, np.int8))):
        scale = SCALES[name]
        t = var(f"{name}_squeezed")
        nodes.append(gs.Node("Squeeze", f"attn/Squeeze_{name}", inputs=[parts[i], gs.Constant(f"axes_{name}", np.array([0]))],
                             outputs=[t]))
        if name == "q":
            scaled = var("q_scaled")
            nodes.append(gs.Node("Mul", "attn/Mul", inputs=[t, gs.Constant("factor", np.array(q_factor, np.float32))],
                                 outputs=[scaled]))
            t = scaled
        if name == "k":
            kt = var("k_t")
            nodes.append(gs.Node("Transpose", "attn/Transpose_k", attrs={"perm": [0, 1, 3, 2]}, inputs=[t], outputs=[kt]))
            t = kt
        if not clip and not mixed_codes:  # 8 bits: one code type for all three
            dtype, zero = np.uint8, 128
        else:
            lo, hi = (np.float32((c - (zero if dtype == np.uint8 else 0)) * scale) for c in ((0, 15) if dtype == np.uint8
                                                                                             else (-8, 7)))
            clipped = var(f"{name}_clipped")
            nodes.append(gs.Node("Clip", f"attn/{name}_clip", inputs=[t, gs.Constant(f"{name}_lo", np.array(lo)),
                                                                     gs.Constant(f"{name}_hi", np.array(hi))],
                                 outputs=[clipped]))
            t = clipped
        codes = gs.Variable(f"{name}_codes", dtype)
        nodes.append(gs.Node("QuantizeLinear", f"attn/{name}_q", outputs=[codes], inputs=[
            t, gs.Constant(f"{name}_scale", np.array(scale, np.float32)), gs.Constant(f"{name}_zero", np.array(zero, dtype))]))
        outputs.append(codes)
    return gs.Graph(nodes, inputs=[x], outputs=outputs, opset=21)


def _codes(graph: gs.Graph, x: np.ndarray) -> list[np.ndarray]:
    return runtime.session(to_model(graph)).run(None, {"qkv": x})


def _inputs() -> np.ndarray:
    """Random qkv, with the first token's q and v on exact rounding ties of their grids."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 7, 3 * HEADS * DIM)) * 3).astype(np.float32)
    ties = np.arange(HEADS * DIM, dtype=np.float32) - 8 + 0.5
    x[0, 0, :HEADS * DIM] = ties * np.float32(SCALES["q"] / 0.125)  # q * 1/8 / scale = m + 1/2
    x[0, 0, 2 * HEADS * DIM:] = ties * np.float32(SCALES["v"])
    return x


@pytest.mark.parametrize("clip", [False, True], ids=["8-bit", "4-bit-clipped"])
def test_codes_are_unchanged_and_the_float_moves_go(clip):
    x = _inputs()
    before = _codes(_attention_inputs(clip, 0.125), x)
    graph = HoistQuantize()(_attention_inputs(clip, 0.125), PassContext())
    after = _codes(graph, x)
    assert all((a == b).all() and a.dtype == b.dtype for a, b in zip(before, after))
    ops = [n.op for n in graph.nodes]
    assert "Mul" not in ops  # 1/sqrt(d) = 2^-3 went into q's scale (and clip bounds)
    quantizers = [n for n in graph.nodes if n.op == "QuantizeLinear"]
    if not clip:  # one per-axis QuantizeLinear of the reshaped qkv, the moves on uint8 codes
        assert len(quantizers) == 1 and quantizers[0].inputs[0].name == "shaped"
        assert quantizers[0].inputs[1].values.tolist() == pytest.approx([2.0**-2, 0.05, 2.0**-6])
    else:  # each clipped branch is quantized straight after the Split, then moved as codes
        assert len(quantizers) == 3 and all(q.inputs[0].inputs[0].op == "Clip" for q in quantizers)
        assert all(q.inputs[0].inputs[0].inputs[0].inputs[0].op == "Split" for q in quantizers)
        for name, (lo, hi) in (("q", (0, 15)), ("k", (-8, 7)), ("v", (-8, 7))):  # bounds still seen through moves
            out = next(t for t in graph.outputs if t.name == f"{name}_codes")
            assert code_range(out, out.dtype) == (lo, hi)


def test_a_mul_that_is_not_a_power_of_two_stays():
    x = _inputs()
    before = _codes(_attention_inputs(True, 0.1), x)
    graph = HoistQuantize()(_attention_inputs(True, 0.1), PassContext())
    assert [n.op for n in graph.nodes].count("Mul") == 1
    assert all((a == b).all() for a, b in zip(before, _codes(graph, x)))


def test_what_it_must_not_move_stays():
    """Mixed code types (k and v signed, as --target-cpu vnni or below 8 bits) are not merged; a
    Mul that something else reads too stays; a graph output keeps its producer."""
    x = _inputs()
    graph = _attention_inputs(False, 0.125, mixed_codes=True)
    before = _codes(graph, x)
    graph = HoistQuantize()(graph, PassContext())
    assert [n.op for n in graph.nodes].count("QuantizeLinear") == 3
    assert all((a == b).all() for a, b in zip(before, _codes(graph, x)))

    graph = _attention_inputs(False, 0.125)
    scaled = next(n for n in graph.nodes if n.op == "Mul").outputs[0]
    graph.outputs.append(scaled)
    graph = HoistQuantize()(graph, PassContext())
    mul = [n for n in graph.nodes if n.op == "Mul"]
    assert len(mul) == 1 and mul[0].outputs[0].name == "q_scaled"
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.outputs[0].name == "q_codes")
    assert q.inputs[0].name == "q_scaled" and "q_scaled" in {t.name for t in graph.outputs}
