"""``vitq-onnx eval``: top-1/top-5, size and latency of an ONNX model (and another beside it), in onnxruntime
or OpenVINO; in OpenVINO, also how far its outputs are from onnxruntime's on the same file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runtime, runtimes
from .progress import Progress
from .errors import VitqError
from .images import Preprocess, label_of, list_images, load_images, load_synsets
from .latency import machine_info, measure_latency, median_ms, ratio
from .validate import feature_similarity


def preprocess_of(model_path, metadata: dict[str, dict]) -> Preprocess:
    """The preprocessing stored in a model's metadata (``runtime.file_metadata``)."""
    meta = metadata.get(runtime.META_PREPROCESS)
    if meta is None:
        raise VitqError(f"{model_path} has no '{runtime.META_PREPROCESS}' metadata: "
                        "export it with vitq-onnx, or copy that entry from one that was")
    return Preprocess.from_dict(meta)


def evaluate(model_path: str | Path, images_dir: str | Path, compare: str | Path | None = None,
             synsets: str | Path | None = None, batch_size: int = 16, progress: bool = True,
             latency: LatencyOptions | None = None, runtime_name: str = "onnxruntime") -> dict:
    """Accuracy of ``model_path`` on every image in the folder, its size, its latency (batch 1 and
    ``latency.batch``) and the machine's; with ``compare``, the same for that model side by side,
    latencies measured interleaved, and the top-1 agreement of the two. A headless model (its
    export's metadata says so) has no classes: no labels are read, and with ``compare`` (e.g. its
    FP32 graph) its features are compared by cosine similarity instead. In another runtime than
    onnxruntime, the model also runs in onnxruntime: its scores there, the top-1 agreement and the
    largest output difference of the two runtimes."""
    paths_models = [Path(model_path)] + ([Path(compare)] if compare is not None else [])
    metadata = runtime.file_metadata(model_path)
    preprocess = preprocess_of(model_path, metadata)
    if compare is not None and preprocess_of(compare, runtime.file_metadata(compare)) != preprocess:
        raise VitqError(f"{model_path} and {compare} take differently preprocessed images: compare models of one input")
    runners = [runtimes.load(p, runtime_name) for p in paths_models]
    if runtime_name != "onnxruntime":
        runners.append(runtimes.load(model_path, "onnxruntime"))
    headless = metadata.get(runtime.META_RECIPE, {}).get("headless", False)
    root = Path(images_dir)
    paths = list_images(root)
    classes = load_synsets(synsets)
    labels_all = {p: -1 if headless else label_of(p, root, classes) for p in paths}
    preds: list[list[np.ndarray]] = [[] for _ in runners]
    labels: list[int] = []
    bar = Progress(len(paths), "evaluating", progress, unit="img")
    for i in range(0, len(paths), batch_size):
        batch, kept = load_images(paths[i:i + batch_size], preprocess)
        labels += [labels_all[p] for p in kept]
        for run, out in zip(runners, preds):
            out.append(runtimes.run(run, batch, batch_size))
        bar.update(len(paths[i:i + batch_size]))
    bar.close()
    y = np.asarray(labels)
    logits = [np.concatenate(p) for p in preds]
    rows = [{"model": str(p), **({} if headless else _accuracy(out, y)), "model_bytes": p.stat().st_size}
            for p, out in zip(paths_models, logits)]
    result = {**rows[0], "images": int(len(y)), "runtime": runtime_name,
              **({"features": int(logits[0][0].size)} if headless else {})}
    if runtime_name != "onnxruntime":
        result["onnxruntime"] = {**({} if headless else _accuracy(logits[-1], y)),
                                 **_agreement(logits[-1], logits[0], headless)}
    if latency is not None:
        blocks = _latency(paths_models, preprocess.size, latency, progress, runtime_name)
        for name, row in zip(blocks, rows):
            row["latency_ms"] = {str(b): round(ms, 3) for b, ms in median_ms(blocks, name).items()}
        result["latency_ms"] = rows[0]["latency_ms"]
        result["machine"] = machine_info(latency.threads, runtime_name)
        if compare is not None:
            result["latency_ratio"] = {str(b): round(r, 4) for b, r in ratio(blocks, "model", "compare").items()}
    if compare is not None:
        result["compare"] = rows[1]
        result.update(_agreement(logits[1], logits[0], headless))
    return result


def _agreement(reference: np.ndarray, logits: np.ndarray, headless: bool) -> dict:
    """How close ``logits`` are to ``reference``: top-1 agreement, or for features their cosine;
    and the largest absolute difference of any output."""
    close = {"feature_similarity": feature_similarity(reference, logits)} if headless else {
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean())}
    same = reference.shape == logits.shape  # (--compare may hold a model of other outputs)
    return {**close, **({"max_abs_output_difference": float(np.abs(reference - logits).max())} if same else {})}


@dataclass(frozen=True)
class LatencyOptions:
    threads: int
    batch: int = 8  # the second batch size measured (batch 1 always)
    rounds: int = 5
    runs_per_block: int = 5


def _accuracy(logits: np.ndarray, y: np.ndarray) -> dict:
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return {"top1": float((top5[:, 0] == y).mean()), "top5": float((top5 == y[:, None]).any(1).mean())}


def _latency(models: list[Path], size: int, opts: LatencyOptions, progress: bool, runtime_name: str) -> dict:
    """Median block times of both models, interleaved, at batch 1 and ``opts.batch`` (random images)."""
    x = np.random.default_rng(0).standard_normal((opts.batch, 3, size, size)).astype(np.float32)
    inputs = {1: x[:1], opts.batch: x}  # (one entry when opts.batch is 1)
    runners = {name: runtimes.load(p, runtime_name, opts.threads) for name, p in zip(("model", "compare"), models)}
    return measure_latency(runners, inputs, opts.rounds, opts.runs_per_block, progress)
