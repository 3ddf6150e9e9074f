"""Choose block-reconstruction settings without touching val: train on part of ../shared calib,
score on the rest.

    python benchmarks/recon_settings.py "iters=180,batch_size=16,lr_weights=3e-4,lr_scales=3e-3"
    python benchmarks/recon_settings.py "method='ias',bits='3/3',float_iters=100,iters=200"
    python benchmarks/recon_settings.py "method='repq',search=dict(mutation=0.02,fitness='mse')"
    python benchmarks/recon_settings.py "method='repq-recon',avg_bits=5"
    python benchmarks/recon_settings.py "tune=dict(iters=100)"

Calibrates DeiT-Ti (W4/A4 unless ``bits``) with ``repq`` + BlockReconstruction(**settings) on 93
calib images and reports, on the 32 held-out calib images (a fixed shuffle, seed 1), the
simulation's top-1, its top-1 agreement with the float model and its KL divergence from the float
model's predictions (the least noisy of the three on 32 images). ``iters=0`` is plain ``repq``.
With ``method``, that method's own reconstruction stages take the settings instead: ``float_*``
ones its float-weight stage (``float_iters=0`` drops it), the others its quantized-weight stage.
``avg_bits`` calibrates the greedy mixed-precision map chosen on the 93 images (widest ``bits``, 8/8
unless given), as ``--avg-bits``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.evol_search import EvolSearch
from vitq_onnx.calibration.methods import Method, get_method
from vitq_onnx.calibration.mixed_precision import choose_widths
from vitq_onnx.calibration.reconstruct import BlockReconstruction, OutputTuning
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.images import Preprocess, label_of, list_images, load_images, load_synsets
from vitq_onnx.models import create_model
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.calibration.simulation import kl_per_image, torch_logits

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
HELD_OUT = 32


def main() -> None:
    settings = eval(f"dict({sys.argv[1] if len(sys.argv) > 1 else ''})")  # noqa: S307 (a local benchmark)
    avg_bits = settings.pop("avg_bits", None)
    bits = BitWidths.parse(settings.pop("bits", "4/4" if avg_bits is None else "8/8"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # 1 to run two trials side by side
    model = create_model("deit_t", SHARED / "models" / "deit_tiny_patch16_224.safetensors")
    pre = Preprocess.from_model(model)
    paths = list_images(CALIB)
    random.Random(1).shuffle(paths)
    train, _ = load_images(paths[HELD_OUT:], pre)
    held, kept = load_images(paths[:HELD_OUT], pre)
    labels = np.array([label_of(p, CALIB, load_synsets()) for p in kept])
    fp = torch_logits(model, held)
    method = settings.pop("method", None)
    search = settings.pop("search", None)
    tune = settings.pop("tune", None)
    if method is None:
        stages = get_method("repq").stages
        if settings.get("iters", 1):
            stages += (BlockReconstruction(**settings),)
    else:
        stages = _with_settings(get_method(method).stages, settings)
    if tune is not None:
        stages += (OutputTuning(**tune),)
    if search is not None:
        stages += (EvolSearch(**search),)
    trial = Method("trial", "", stages)
    start = time.time()
    if avg_bits is not None:
        bits = choose_widths(model, train, bits, avg_bits, "deit_tiny_patch16_224",
                             lambda m: print(m, file=sys.stderr), progress=False, method=trial)[0]
    recipe = calibrate(model, train, bits, trial, "deit_tiny_patch16_224", CalibOptions())
    seconds = time.time() - start
    q = torch_logits(simulate(model, recipe), held)
    kl = kl_per_image(torch.from_numpy(q), torch.from_numpy(fp)).mean().item()
    print(json.dumps({"settings": sys.argv[1:], "calibration_s": round(seconds), "held_out_top1": float((q.argmax(1) == labels).mean()),
                      "fp_top1": float((fp.argmax(1) == labels).mean()),
                      "agreement_with_fp": float((q.argmax(1) == fp.argmax(1)).mean()), "kl_to_fp": round(kl, 4),
                      **({"search": recipe.info["search"]} if "search" in recipe.info else {}),
                      **({"block_loss_after": recipe.info["reconstruction"]["loss_after"]}
                         if "reconstruction" in recipe.info else {})}))


def _with_settings(stages, settings: dict) -> tuple:
    float_settings = {k[len("float_"):]: v for k, v in settings.items() if k.startswith("float_")}
    quantized = {k: v for k, v in settings.items() if not k.startswith("float_")}
    out = []
    for stage in stages:
        if isinstance(stage, BlockReconstruction):
            chosen = quantized if stage.quantized_weights else float_settings
            if chosen.get("iters", 1) == 0:
                continue
            stage = dataclasses.replace(stage, **chosen)
        out.append(stage)
    return tuple(out)


if __name__ == "__main__":
    main()
