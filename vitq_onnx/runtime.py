"""onnxruntime helpers: sessions, batched inference, the metadata vitq-onnx stores in models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .cpu import check_target
from .errors import VitqError

META_PREPROCESS = "vitq.preprocess"
META_RECIPE = "vitq.recipe"
META_VALIDATION = "vitq.validation"


def session(model, threads: int | None = None, optimized_path: str | None = None) -> ort.InferenceSession:
    """CPU session from a path, bytes or ModelProto."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise VitqError(f"model not found: {model}")
        model = str(model)
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VitqError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
    target = (get_metadata(sess, META_RECIPE) or {}).get("target_cpu", "portable")
    check_target(target, str(model) if isinstance(model, str) else "this model")
    return sess


def run(sess: ort.InferenceSession, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def set_metadata(model: onnx.ModelProto, key: str, value: dict) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(value)
            return
    model.metadata_props.add(key=key, value=json.dumps(value))


def file_metadata(path: str | Path) -> dict[str, dict]:
    """The vitq-onnx metadata entries (key -> value) read from the file itself (no session: any
    runtime's model); one read of the file for all of them."""
    if not Path(path).is_file():
        raise VitqError(f"model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise VitqError(f"{path} is not an ONNX model: {str(exc).splitlines()[0][:200]}") from None
    return {p.key: json.loads(p.value) for p in model.metadata_props if p.key.startswith("vitq.") and p.value}


def get_metadata(sess: ort.InferenceSession, key: str) -> dict | None:
    value = sess.get_modelmeta().custom_metadata_map.get(key)
    return json.loads(value) if value else None
