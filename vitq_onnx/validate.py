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
from .simulation import simulate


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    diff = np.abs(reference - candidate)
    return {
        "images": int(len(reference)),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "max_abs_logit_error": float(diff.max()),
        "mean_abs_logit_error": float(diff.mean()),
    }


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def validate_export(qmodel: onnx.ModelProto, model: torch.nn.Module, recipe: Recipe, images, progress: bool,
                    batch_size: int = 32) -> dict:
    """onnxruntime against the simulation (bit-exactness) and against the FP model (usefulness)."""
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
    logits = np.concatenate(ort_logits)
    report = compare_logits(np.concatenate(sim_logits), logits)
    report["fp_top1_agreement"] = compare_logits(np.concatenate(fp_logits), logits)["top1_agreement"]
    return report
