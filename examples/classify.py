"""Classify images with a vitq-onnx model using only onnxruntime, numpy and Pillow.

    python examples/classify.py deit_t_w4a4.onnx photo1.jpg photo2.jpg [--labels synsets.txt]

The model carries its preprocessing (timm's eval transform) in the metadata entry
``vitq.preprocess``; nothing from vitq-onnx or PyTorch is needed at inference time. A model
exported with ``--target-cpu vnni`` says so in ``vitq.recipe`` and is refused on a CPU without
VNNI/AMX (its full-range 8-bit products could saturate there). A model without the preprocessing
entry, or an image or labels file that cannot be read, ends with one ``classify.py: error:``
line and exit code 1.
"""

import argparse
import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def preprocess(path: str, cfg: dict) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    scale = math.floor(cfg["size"] / cfg["crop_pct"])  # short side before the center crop
    w, h = img.size
    w2, h2 = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    img = img.resize((w2, h2), {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[cfg["interpolation"]])
    top, left = round((h2 - cfg["size"]) / 2), round((w2 - cfg["size"]) / 2)
    img = img.crop((left, top, left + cfg["size"], top + cfg["size"]))
    x = (np.asarray(img, np.float32) / 255 - np.float32(cfg["mean"])) / np.float32(cfg["std"])
    return x.transpose(2, 0, 1)


class Failed(Exception):
    """What went wrong, in one line."""


def load(model: str):
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Failed(f"onnxruntime cannot load {model}: {str(exc).splitlines()[0][:160]}") from None
    metadata = session.get_modelmeta().custom_metadata_map
    meta = metadata.get("vitq.preprocess")
    if meta is None:
        raise Failed(f"{model} has no 'vitq.preprocess' metadata: it was not exported by vitq-onnx")
    target = json.loads(metadata.get("vitq.recipe", "{}")).get("target_cpu", "portable")
    if target == "vnni" and not has_int8_dot():
        raise Failed(f"{model} was exported for CPUs with VNNI or AMX (--target-cpu vnni); this CPU has neither")
    return session, json.loads(meta)


def has_int8_dot() -> bool:
    """x86 VNNI/AMX or Arm dot-product instructions, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def read(path: str, cfg: dict) -> np.ndarray:
    try:
        return preprocess(path, cfg)
    except Exception as exc:  # missing, truncated or not an image: PIL raises several types
        raise Failed(f"cannot read image {path}: {str(exc).splitlines()[0][:160]}") from None


def read_labels(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError as exc:
        raise Failed(f"cannot read labels {path}: {exc.strerror}") from None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", help="one class per line (e.g. ImageNet synsets.txt)")
    args = p.parse_args()
    try:
        classify(args)
    except Failed as exc:
        print(f"classify.py: error: {exc}", file=sys.stderr)
        sys.exit(1)


def classify(args) -> None:
    session, cfg = load(args.model)
    labels = read_labels(args.labels) if args.labels else None
    batch = np.stack([read(path, cfg) for path in args.images])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for path, row in zip(args.images, probs):
        top = np.argsort(-row)[:5]
        names = [labels[i] if labels else str(i) for i in top]
        print(path + ": " + ", ".join(f"{n} {row[i]:.1%}" for n, i in zip(names, top)))


if __name__ == "__main__":
    main()
