"""Does the ONNX model compute what the PyTorch simulation computes, and is it still the FP model?

Measured, not assumed: bit-exactness against the simulation, usefulness against the FP model.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from . import runtime
from .progress import Progress
from .recipe import Recipe
from .calibration.simulation import simulate, torch_logits


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    diff = np.abs(reference - candidate)
    return {
        "images": int(len(reference)),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "max_abs_logit_error": float(diff.max()),
        "mean_abs_logit_error": float(diff.mean()),
    }


def feature_similarity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per-image cosine similarity (mean and worst) and the largest |difference| of feature vectors."""
    ref, cand = (x.reshape(len(x), -1).astype(np.float64) for x in (reference, candidate))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = (ref * cand).sum(1) / np.maximum(norms, 1e-30)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_error": float(np.abs(ref - cand).max())}


def validate_export(qmodel: onnx.ModelProto, model: torch.nn.Module, recipe: Recipe, images, progress: bool,
                    batch_size: int = 32) -> dict:
    """onnxruntime against the simulation (bit-exactness) and against the FP model (usefulness).

    ``exact_images`` is the share of images whose outputs are equal bit for bit. A classifier is
    also compared by top-1; a headless model (``num_classes == 0``: its outputs are features,
    where top-1 means nothing) by cosine similarity, to the simulation and to the FP model."""
    sess, sim = runtime.session(qmodel), simulate(model, recipe)
    bar = Progress(len(images), "validation", progress, unit="img")
    ort_logits, sim_logits, fp_logits = [], [], []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        ort_logits.append(runtime.run(sess, batch))
        sim_logits.append(torch_logits(sim, batch))
        fp_logits.append(torch_logits(model, batch))
        bar.update(len(batch))
    bar.close()
    logits, sim_out, fp_out = np.concatenate(ort_logits), np.concatenate(sim_logits), np.concatenate(fp_logits)
    exact = float((sim_out.reshape(len(sim_out), -1) == logits.reshape(len(logits), -1)).all(1).mean())
    if is_headless(model):
        return {"images": int(len(logits)), "exact_images": exact,
                **{f"sim_{k}": v for k, v in feature_similarity(sim_out, logits).items()},
                **{f"fp_{k}": v for k, v in feature_similarity(fp_out, logits).items()}}
    report = compare_logits(sim_out, logits)
    report["exact_images"] = exact
    report["fp_top1_agreement"] = compare_logits(fp_out, logits)["top1_agreement"]
    return report


def is_headless(model: torch.nn.Module) -> bool:
    return getattr(model, "num_classes", None) == 0
