"""The runtimes ``eval`` runs a model in: onnxruntime, and OpenVINO's CPU plugin (optional extra).

A loaded model is a callable from a float32 image batch to its first output, so accuracy and the
interleaved latency (latency.py) treat every runtime alike. OpenVINO is asked for float32
inference: on CPUs with bfloat16 (AVX512-BF16, AMX) its default runs float ops in bfloat16, which
rounds the exact integer sums these files compute in float32 (docs/runtimes.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from . import runtime
from .errors import VitqError
from .formats import RUNTIMES

Runner = Callable[[np.ndarray], np.ndarray]
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def load(path: str | Path, name: str = "onnxruntime", threads: int | None = None) -> Runner:
    """The model at ``path`` ready to run in runtime ``name``, on ``threads`` threads (default: all)."""
    if name == "onnxruntime":
        sess = runtime.session(path, threads=threads)
        feed = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {feed: x})[0]
    if name == "openvino":
        return _openvino(Path(path), threads)
    raise VitqError(f"unknown runtime '{name}': use one of {', '.join(RUNTIMES)}")


def version(name: str) -> str:
    if name == "openvino":
        return _import_openvino().get_version()
    import onnxruntime

    return onnxruntime.__version__


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise VitqError("--runtime openvino needs OpenVINO: pip install -e '.[openvino]'") from None
    return openvino


# why a vitq-onnx file of another format would not run correctly in OpenVINO (docs/runtimes.md)
OPENVINO_REFUSED = {
    "ort": "uses onnxruntime's com.microsoft integer kernels",
    "qdq": "has forms OpenVINO 2026.4 runs wrongly or not at all (a per-axis activation quantizer, "
           "int4 activation codes, BitShift)",
}


def _openvino(path: Path, threads: int | None) -> Runner:
    ov = _import_openvino()
    fmt = runtime.file_metadata(path).get(runtime.META_RECIPE, {}).get("format")
    if fmt in OPENVINO_REFUSED:
        raise VitqError(f"{path} is a --format {fmt} file, which {OPENVINO_REFUSED[fmt]}: "
                        "export it with --format openvino (the same recipe: --recipe)")
    config = dict(OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line trace
        lines = [line for line in str(exc).splitlines() if line.strip() and "Exception from" not in line]
        raise VitqError(f"OpenVINO cannot compile {path}: {(lines or ['?'])[0][:200]}") from None
    request = compiled.create_infer_request()
    return lambda x: np.array(request.infer([np.ascontiguousarray(x)])[0])


def run(runner: Runner, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([runner(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
