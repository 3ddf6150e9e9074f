"""Accuracy benchmark: export with the CLI, score on ../shared val in onnxruntime, check vs simulation.

    python benchmarks/accuracy.py --configs deit_t:8/8:repq deit_t:4/4:repq -o benchmarks/results/accuracy.md

Each config ``model[@img_size]:W/A:method[:qdq][:reuse][:random][:budget=MIN]`` is exported (``--format ort`` unless ``qdq``) by ``vitq-onnx export`` (timed as a user runs it,
imports included), calibrated on ../shared calib (each method's default number of images unless
--num-calib), then evaluated on all of val:
onnxruntime top-1/top-5, the PyTorch simulation's top-1 and the top-1 agreement between the two.
With ``reuse`` the export deploys the recipe of the same config's
``ort`` export (run earlier in the list) with ``--recipe`` instead of calibrating again
(calibration is deterministic: it would compute the same recipe); ``@img_size`` builds the model
at that input size (a checkpoint's position embedding resampled) and scores val at it;
``budget=MIN`` exports with ``--time-budget MIN`` (its peak memory is recorded). A ``fp32`` config scores the exported FP32 graph and checks it against torch. Models without real
weights (``model:W/A:method:random``) are scored for agreement only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vitq_onnx import runtime
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.images import (
    Preprocess,
    label_of,
    list_images,
    load_images,
    load_synsets,
)
from vitq_onnx.models import create_model
from vitq_onnx.recipe import Recipe
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import compare_logits, torch_logits

SHARED = Path(os.environ.get("VITQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = {"deit_t": SHARED / "models" / "deit_tiny_patch16_224.safetensors"}
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"


def export(model: str, bits: str, method: str, random: bool, fmt: str, out: Path, num_calib: int | None,
           recipe: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Seconds of ``vitq-onnx export`` and the report it prints (validation, stage seconds)."""
    args = [sys.executable, "-m", "vitq_onnx.cli", "export", "--model", model, "--format", fmt,
            "--calib", str(CALIB), "-o", str(out)]
    args += ["--recipe", str(recipe)] if recipe else ["--bits", bits, "--method", method]
    args += ["--num-calib", str(num_calib)] if num_calib else []
    args += ["--random-weights"] if random else ["--weights", str(WEIGHTS[model])]
    start = time.time()
    done = subprocess.run(args + list(extra), check=True, stdout=subprocess.PIPE, text=True)
    return time.time() - start, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--work", type=Path, default=Path("runs/accuracy"))
    p.add_argument("--val-limit", type=int, default=0, help="score on the first N val images only")
    p.add_argument("--num-calib", type=int, help="calibration images per export (default: the method's)")
    p.add_argument("--no-sim", action="store_true",
                   help="skip the simulation on val (its top-1 and the agreement; the export still checks "
                        "agreement on the calibration images)")
    p.add_argument("-o", "--output", type=Path, required=True, help="markdown table (and .json beside)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    rows, cache = [], {}
    for config in args.configs:
        model_at, bits, method, *rest = config.split(":")
        model_name, _, img_size = model_at.partition("@")
        settings = dict(f.split("=", 1) for f in rest if "=" in f)
        random = "random" in rest
        fmt = "qdq" if "qdq" in rest else "ort"
        size_args = ("--img-size", img_size) if img_size else ()
        budget_args = ("--time-budget", settings["budget"]) if "budget" in settings else ()
        if model_at not in cache:
            fp = create_model(model_name, None if random else WEIGHTS[model_name], random_weights=random,
                              img_size=int(img_size) if img_size else None)
            pre = Preprocess.from_model(fp)
            paths = list_images(VAL)[: args.val_limit or None] if not random else list_images(CALIB)[-8:]
            images, kept = load_images(paths, pre)
            labels = np.array([label_of(p, VAL, load_synsets()) for p in kept]) if not random else None
            fp32_onnx = runtime.run(runtime.session(export_fp32(fp, pre.size)), images)
            cache[model_at] = (fp, images, labels, torch_logits(fp, images), fp32_onnx)
        fp, images, labels, fp_logits, fp32_onnx = cache[model_at]
        tag = f"{model_name}{'_' + img_size if img_size else ''}_w{bits.replace('/', 'a')}_{method}" \
              f"{'_b' + settings['budget'] if 'budget' in settings else ''}"
        out = args.work / f"{tag}{'_qdq' if fmt == 'qdq' else ''}.onnx"
        ort_recipe = out.with_name(out.stem.removesuffix("_qdq") + ".recipe.json")
        seconds, report = export(model_name, bits, method, random, fmt, out, args.num_calib,
                                 ort_recipe if "reuse" in rest else None, size_args + budget_args)
        print(f"{config}: exported in {seconds:.1f} s; scoring", file=sys.stderr)
        ort_logits = runtime.run(runtime.session(out), images)
        sim_logits = None if args.no_sim else torch_logits(
            simulate(fp, Recipe.load(out.with_name(out.stem + ".recipe.json"))), images)
        row = {"config": config, "images": len(images),
               "export_s": f"{seconds:.1f} (recipe reused)" if "reuse" in rest else round(seconds, 1),
               "ort_vs_sim": None if sim_logits is None else compare_logits(sim_logits, ort_logits),
               "fp32_onnx_vs_torch": compare_logits(fp_logits, fp32_onnx),
               "peak_mb": max(report.get("stage_peak_mb", {0: 0}).values())}
        if labels is not None:
            row.update({
                "torch_fp32_top1": float((fp_logits.argmax(1) == labels).mean()),
                "onnx_fp32_top1": float((fp32_onnx.argmax(1) == labels).mean()),
                "sim_top1": None if sim_logits is None else float((sim_logits.argmax(1) == labels).mean()),
                "onnx_top1": float((ort_logits.argmax(1) == labels).mean()),
                "onnx_top5": float((np.argsort(-ort_logits, 1)[:, :5] == labels[:, None]).any(1).mean()),
            })
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        write(rows, args.output)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def write(rows: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| config | images | FP32 torch top-1 | FP32 ONNX top-1 | sim top-1 | ONNX top-1 | ONNX top-5 "
             "| ONNX vs sim top-1 agreement | max / mean \\|Δlogit\\| | export s | export peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["ort_vs_sim"] or {"top1_agreement": None}
        delta = "—" if r["ort_vs_sim"] is None else f"{a['max_abs_logit_error']:.3f} / {a['mean_abs_logit_error']:.4f}"
        lines.append(f"| {r['config']} | {r['images']} | {pct(r.get('torch_fp32_top1'))} | {pct(r.get('onnx_fp32_top1'))} "
                     f"| {pct(r.get('sim_top1'))} | {pct(r.get('onnx_top1'))} | {pct(r.get('onnx_top5'))} "
                     f"| {pct(a['top1_agreement'])} | {delta} "
                     f"| {r['export_s']} | {r.get('peak_mb') or '—'} |")
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
