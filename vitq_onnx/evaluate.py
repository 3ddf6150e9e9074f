"""``vitq-onnx eval``: top-1/top-5 of an ONNX model on labelled images, onnxruntime only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import runtime
from .progress import Progress
from .errors import VitqError
from .images import Preprocess, label_of, list_images, load_images, load_synsets


def preprocess_of(sess, model_path) -> Preprocess:
    meta = runtime.get_metadata(sess, runtime.META_PREPROCESS)
    if meta is None:
        raise VitqError(f"{model_path} has no '{runtime.META_PREPROCESS}' metadata: "
                        "export it with vitq-onnx, or copy that entry from one that was")
    return Preprocess.from_dict(meta)


def evaluate(model_path: str | Path, images_dir: str | Path, compare: str | Path | None = None,
             synsets: str | Path | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy of ``model_path`` (and top-1 agreement with ``compare``) on every image in the folder."""
    sessions = [runtime.session(model_path)]
    if compare is not None:
        sessions.append(runtime.session(compare))
    preprocess = preprocess_of(sessions[0], model_path)
    root = Path(images_dir)
    paths = list_images(root)
    classes = load_synsets(synsets)
    labels_all = {p: label_of(p, root, classes) for p in paths}
    preds: list[list[np.ndarray]] = [[] for _ in sessions]
    labels: list[int] = []
    bar = Progress(len(paths), "evaluating", progress, unit="img")
    for i in range(0, len(paths), batch_size):
        batch, kept = load_images(paths[i:i + batch_size], preprocess)
        labels += [labels_all[p] for p in kept]
        for sess, out in zip(sessions, preds):
            out.append(runtime.run(sess, batch, batch_size))
        bar.update(len(paths[i:i + batch_size]))
    bar.close()
    y = np.asarray(labels)
    logits = np.concatenate(preds[0])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    result = {
        "model": str(model_path), "images": int(len(y)),
        "top1": float((top5[:, 0] == y).mean()), "top5": float((top5 == y[:, None]).any(1).mean()),
    }
    if compare is not None:
        other = np.concatenate(preds[1])
        result["compare"] = str(compare)
        result["compare_top1"] = float((other.argmax(1) == y).mean())
        result["top1_agreement"] = float((other.argmax(1) == logits.argmax(1)).mean())
    return result
