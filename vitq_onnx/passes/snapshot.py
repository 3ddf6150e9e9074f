"""``--save-passes`` snapshots for Netron: every tensor's shape, and the model's metadata.

ONNX shape inference does not know onnxruntime's ``com.microsoft`` operators (the integer
kernels of the ``ort`` format), so everything after them would lose its shape. What it leaves
unknown is measured instead: onnxruntime runs the snapshot at batch 1 and 2, and a dimension that
doubles is the batch. Tensors that still have no shape are listed in the metadata entry
``vitq.shapes_unknown``. The metadata (preprocessing) makes every snapshot a model ``vitq-onnx
eval`` and ``examples/classify.py`` can run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .. import runtime
from ..outputs import staged

SHAPES_UNKNOWN = "vitq.shapes_unknown"
_FOUR_BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _shaped(model: onnx.ModelProto) -> set[str]:
    """Tensors whose every dimension is a number or a named symbol (not an inferred ``unk__N``)."""
    infos = list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)
    return {v.name for v in infos if v.type.tensor_type.HasField("shape") and all(
        d.HasField("dim_value") or (d.HasField("dim_param") and not d.dim_param.startswith("unk__"))
        for d in v.type.tensor_type.shape.dim)}


def _measured_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Run the model at batch 1 and 2 with ``names`` as extra outputs; their shapes, batch symbolic.
    4-bit tensors (no numpy type) are read through a Cast to 8 bits."""
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    read = {}
    for n in names:
        read[n] = n
        if types.get(n) in _FOUR_BIT:
            read[n] = f"{n}/shape_probe"
            probe.graph.node.append(onnx.helper.make_node("Cast", [n], [read[n]], to=onnx.TensorProto.INT8))
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(r) for r in read.values())
    try:
        sess = runtime.session(probe)
        inp = sess.get_inputs()[0]
        size = [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        runs = [sess.run(list(read.values()), {inp.name: np.zeros([b, *size], np.float32)}) for b in (1, 2)]
    except Exception:  # a snapshot onnxruntime cannot run keeps those shapes unknown (and listed)
        return {}
    infos = {}
    for name, one, two in zip(names, *runs):
        dims = [d1 if d1 == d2 else ("batch" if d1 == 1 else f"{d1}*batch") if d2 == 2 * d1 else "?"
                for d1, d2 in zip(one.shape, two.shape)]
        elem = types.get(name) or onnx.helper.np_dtype_to_tensor_dtype(one.dtype)
        infos[name] = onnx.helper.make_tensor_value_info(name, elem, dims)
    return infos


def with_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with a shape for every node output it can have; and the names of those without."""
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    outputs = [o for node in model.graph.node for o in node.output if o]
    missing = [o for o in outputs if o not in _shaped(model)]
    if missing:
        measured = _measured_shapes(model, missing)
        kept = [v for v in model.graph.value_info if v.name not in measured]
        graph_outputs = {v.name for v in model.graph.output}
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept + [v for n, v in measured.items() if n not in graph_outputs])
        missing = [o for o in missing if o not in measured]
    return model, missing


def save_snapshot(model: onnx.ModelProto, path: Path, metadata: list[onnx.StringStringEntryProto]) -> int:
    """Write ``model`` (shapes completed, ``metadata`` carried) to ``path`` at once; returns the
    number of tensors left without a shape."""
    model, missing = with_shapes(model)
    del model.metadata_props[:]
    model.metadata_props.extend(metadata)
    if missing:
        runtime.set_metadata(model, SHAPES_UNKNOWN, {"tensors": missing})
    with staged(path.parent) as tmp:
        onnx.save(model, tmp / path.name)
    return len(missing)
