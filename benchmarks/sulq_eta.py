"""What deploying SULQ with eta = 2^-j costs against the paper's free eta, in the simulation.

    python benchmarks/sulq_eta.py -o benchmarks/results/sulq_eta.md --bits 3/3 4/4 6/6

For each width, DeiT-Ti is calibrated twice on ../shared calib (32 images) with ``ias-sulq``:
once with the deployable grid eta in {2^-j, j = 0..15} (kind ``sulq``), once with the paper's
grid {0.001 ... 1.0} (kind ``sulq-free``, which has no integer graph). Both recipes are scored
by the PyTorch simulation (the reference the ONNX model matches bit for bit) on all of val.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import Method, get_method
from vitq_onnx.calibration.stages import FitActivations
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.images import Preprocess, label_of, list_images, load_images, load_synsets
from vitq_onnx.models import create_model
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import torch_logits

SHARED = Path(os.environ.get("VITQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"


def with_softmax_kind(kind: str) -> Method:
    base = get_method("ias-sulq")
    stages = tuple(FitActivations(lambda bits: kind) if isinstance(s, FitActivations) else s for s in base.stages)
    return Method(f"ias-sulq ({kind})", "", stages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["3/3", "4/4", "6/6"])
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = create_model("deit_t", SHARED / "models" / "deit_tiny_patch16_224.safetensors")
    pre = Preprocess.from_model(model)
    calib, _ = load_images(list_images(CALIB)[:32], pre)
    val, kept = load_images(list_images(VAL), pre)
    labels = np.array([label_of(path, VAL, load_synsets()) for path in kept])
    rows = []
    for bits in args.bits:
        row = {"bits": bits}
        for kind in ("sulq", "sulq-free"):
            recipe = calibrate(model, calib, BitWidths.parse(bits), with_softmax_kind(kind), "deit_tiny_patch16_224",
                               CalibOptions(progress=False))
            etas = Counter(f"{float(q.params['eta']):g}" for q in recipe.activations.values() if q.kind == kind)
            logits = torch_logits(simulate(model, recipe), val)
            row[kind] = {"top1": float((logits.argmax(1) == labels).mean()), "etas": dict(etas)}
        rows.append(row)
        print(json.dumps(row))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| W/A | eta = 2^-j (deployed) top-1 | free eta (paper's grid) top-1 | difference | etas chosen (2^-j) "
             "| etas chosen (free) |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["sulq"], r["sulq-free"]
        lines.append(f"| {r['bits']} | {100 * a['top1']:.2f} | {100 * b['top1']:.2f} | {100 * (a['top1'] - b['top1']):+.2f} "
                     f"| {a['etas']} | {b['etas']} |")
    args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
