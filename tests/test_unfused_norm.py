"""unfused_norm: onnxruntime would fuse a residual Add into SkipLayerNormalization, whose last bits
differ from the LayerNormalization kernel the simulation runs; after the pass it cannot."""

import numpy as np
import onnx_graphsurgeon as gs
import torch

from vitq_onnx import runtime, runtime_kernels
from vitq_onnx.passes import PassContext
from vitq_onnx.passes.base import to_model
from vitq_onnx.passes.unfused_norm import UnfusedNorm, fusible_adds


def _residual_norm() -> gs.Graph:
    """Two [batch, 50, 64] tensors added, then LayerNorm: the pattern onnxruntime fuses."""
    rng = np.random.default_rng(0)
    a, b = (gs.Variable(n, np.float32, ["batch", 50, 64]) for n in ("a", "b"))
    s, y = gs.Variable("s", np.float32), gs.Variable("y", np.float32)
    gamma, beta = (gs.Constant(n, rng.standard_normal(64).astype(np.float32)) for n in ("gamma", "beta"))
    nodes = [gs.Node("Add", "blocks.0/Add", inputs=[a, b], outputs=[s]),
             gs.Node("LayerNormalization", "norm/LayerNormalization", attrs={"axis": -1, "epsilon": 1e-6},
                     inputs=[s, gamma, beta], outputs=[y])]
    return gs.Graph(nodes, inputs=[a, b], outputs=[y], opset=21)


def _outputs(graph: gs.Graph, a, b) -> np.ndarray:
    model = to_model(graph)
    sess = runtime.session(model)
    return sess.run(None, {"a": a, "b": b})[0]


def test_residual_norm_runs_the_simulation_kernel_after_the_pass():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((4, 50, 64)).astype(np.float32) * 4 for _ in range(2))
    graph = _residual_norm()
    gamma, beta = (torch.from_numpy(graph.nodes[1].inputs[i].values) for i in (1, 2))
    expected = runtime_kernels.layer_norm(torch.from_numpy(a) + torch.from_numpy(b), gamma, beta, 1e-6).numpy()
    fused = _outputs(graph, a, b)
    assert (fused != expected).any()  # SkipLayerNormalization: other last bits
    assert len(fusible_adds(graph)) == 1
    unfused = UnfusedNorm()(graph, PassContext())
    assert [n.op for n in unfused.nodes] == ["Sum", "LayerNormalization"] and not fusible_adds(unfused)
    assert (_outputs(unfused, a, b) == expected).all()
