"""Passes over an onnx-graphsurgeon graph, run in order, each saved for Netron on request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..progress import sayer
from ..recipe import Recipe
from .snapshot import save_snapshot


@dataclass
class PassContext:
    """What passes may read: the recipe and the output options, never the PyTorch model."""

    recipe: Optional[Recipe] = None
    format: str = "ort"
    target_cpu: str = "portable"  # "vnni": full-range s8 operands (cpu.py)
    notes: dict = field(default_factory=dict)


class Pass:
    """One named, individually testable graph rewrite.

    ``run`` edits the graph in place, or returns a replacement graph.
    """

    name = "pass"

    def run(self, graph: gs.Graph, ctx: PassContext) -> Optional[gs.Graph]:
        raise NotImplementedError

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        return (self.run(graph, ctx) or graph).cleanup().toposort()


class OpBuilder:
    """Appends ops to a graph, each node and its output named ``<prefix><sep><name>``."""

    def __init__(self, graph: gs.Graph, prefix: str, sep: str = "/"):
        self.graph, self.prefix, self.sep = graph, prefix, sep

    def const(self, name: str, value, dtype=np.float64) -> gs.Constant:
        return gs.Constant(f"{self.prefix}{self.sep}{name}", np.asarray(value, dtype=dtype))

    def op(self, op: str, name: str, inputs, out=None, dtype=None, domain=None, **attrs) -> gs.Variable:
        full = f"{self.prefix}{self.sep}{name}"
        out = out if out is not None else gs.Variable(full, dtype=dtype)
        self.graph.nodes.append(gs.Node(op, full, attrs=attrs, inputs=inputs, outputs=[out], domain=domain))
        return out


def node_index(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


_PACKED = {np.dtype(ml_dtypes.int4): np.int8, np.dtype(ml_dtypes.uint4): np.uint8}  # -> export container


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export; int4/uint4 constants (ml_dtypes arrays) are stored packed two per byte.

    onnx-graphsurgeon 0.6 does not pack 4-bit arrays, so they leave it as 8-bit and onnx's
    numpy_helper, which does, writes them back.
    """
    narrow = {t.name: t for t in graph.tensors().values()
              if isinstance(t, gs.Constant) and t.values.dtype in _PACKED}
    originals = {name: t.values for name, t in narrow.items()}
    for t in narrow.values():
        t.values = t.values.astype(_PACKED[t.values.dtype])
    try:
        model = gs.export_onnx(graph)
    finally:
        for name, t in narrow.items():
            t.values = originals[name]
    for init in model.graph.initializer:
        if init.name in originals:
            init.CopyFrom(onnx.numpy_helper.from_array(originals[init.name], init.name))
    return model


def run_passes(model: onnx.ModelProto, passes: list[Pass], ctx: PassContext,
               save_dir: str | Path | None = None, progress: bool = True) -> onnx.ModelProto:
    """Apply ``passes`` in order; with ``save_dir`` write 00_fp32.onnx, 01_<pass>.onnx, ...
    (``snapshot.py``: shapes and ``model``'s metadata in each)."""
    say = sayer(progress)

    def snapshot(snap: onnx.ModelProto, name: str) -> None:
        if save_dir is not None:
            unknown = save_snapshot(snap, Path(save_dir) / name, list(model.metadata_props))
            if unknown:
                say(f"  {name}: {unknown} tensors without a shape (listed in its metadata)")

    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    snapshot(model, "00_fp32.onnx")
    graph = gs.import_onnx(model)
    for i, p in enumerate(passes, 1):
        say(f"pass {i}/{len(passes)}: {p.name}")
        graph = p(graph, ctx)
        if save_dir is not None:
            snapshot(to_model(graph), f"{i:02d}_{p.name}.onnx")
    return to_model(graph)
