"""Evol-Q's search as a refinement: each method with and without ``--search evol`` on DeiT-Ti.

    python benchmarks/evol_search.py --configs repq-recon:4/4 ias:3/3 repq:8/8 -o benchmarks/results/evol_search.md
    python benchmarks/evol_search.py --configs repq:4/4 --fitness infonce mse -o benchmarks/results/evol_fitness.md

Each ``method:W/A`` is exported by the CLI (calibrated on ../shared calib), then refined from its
recipe with ``--recipe ... --search evol`` (the same calibration, so the difference is the
search's alone; its images: all of calib, 32 held out to stop it), once per ``--fitness``. Both
are scored in onnxruntime on all of val, the searched one also against its PyTorch simulation;
the search's seconds are the stage's own, as the export reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from accuracy import CALIB, VAL, WEIGHTS, export
from vitq_onnx import runtime
from vitq_onnx.images import Preprocess, label_of, list_images, load_images, load_synsets
from vitq_onnx.models import create_model
from vitq_onnx.recipe import Recipe
from vitq_onnx.calibration.simulation import simulate
from vitq_onnx.validate import compare_logits, torch_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True, help="method:W/A")
    p.add_argument("--fitness", nargs="+", default=["infonce"], choices=["infonce", "mse"])
    p.add_argument("--work", type=Path, default=Path("runs/evol_search"))
    p.add_argument("--reuse", action="store_true", help="keep a base export already in --work (same code, same recipe)")
    p.add_argument("--search-budget", type=float, metavar="MIN", help="passed to the export (default: its own)")
    p.add_argument("-o", "--output", type=Path, required=True, help="markdown table (and .json beside)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    fp = create_model("deit_t", WEIGHTS["deit_t"])
    images, kept = load_images(list_images(VAL), Preprocess.from_model(fp))
    labels = np.array([label_of(p, VAL, load_synsets()) for p in kept])

    def top1(model: Path) -> float:
        return float((runtime.run(runtime.session(model), images).argmax(1) == labels).mean())

    rows = []
    for config in args.configs:
        method, bits = config.split(":")
        base = args.work / f"{method}_w{bits.replace('/', 'a')}.onnx"
        reused = args.reuse and base.with_name(base.stem + ".recipe.json").exists()
        base_s = 0.0 if reused else export("deit_t", bits, method, False, "ort", base, None)[0]
        base_top1 = top1(base)
        print(f"{config}: {100 * base_top1:.2f} % without the search ({base_s:.0f} s)", file=sys.stderr)
        for fitness in args.fitness:
            out = base.with_name(f"{base.stem}_evol_{fitness}.onnx")
            seconds, report = export("deit_t", bits, method, False, "ort", out, None, base.with_name(base.stem + ".recipe.json"),
                                     ("--search", "evol", "--search-fitness", fitness,
                                      *(["--search-budget", str(args.search_budget)] if args.search_budget else [])))
            recipe = Recipe.load(out.with_name(out.stem + ".recipe.json"))
            ort = runtime.run(runtime.session(out), images)
            sim = torch_logits(simulate(fp, recipe), images)
            search = recipe.info["search"]
            rows.append({"config": config, "fitness": fitness, "top1_without": base_top1,
                         "top1_with": float((ort.argmax(1) == labels).mean()),
                         "sim_agreement": compare_logits(sim, ort)["top1_agreement"],
                         "search_s": round(sum(v for k, v in report["stage_seconds"].items() if "evol_search" in k)),
                         "base_export_s": "reused" if reused else round(base_s), "search": search})
            print(json.dumps(rows[-1]), file=sys.stderr)
            write(rows, args.output)


def write(rows: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | W/A | fitness | top-1 without | top-1 with | Δ | ONNX vs sim agreement | search s "
             "| evaluations | passes that kept a block | stopped by | held-out KL before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, (method, bits) = r["search"], r["config"].split(":")
        lines.append(f"| {method} | {bits} | {r['fitness']} | {100 * r['top1_without']:.2f} | {100 * r['top1_with']:.2f} "
                     f"| {100 * (r['top1_with'] - r['top1_without']):+.2f} | {100 * r['sim_agreement']:.2f} "
                     f"| {r['search_s']} | {s['evaluations']} "
                     f"| {sum(bool(p['blocks_kept']) for p in s['passes'])} | {s['stopped']} "
                     f"| {s['held_out_kl_before']:.4f} → {s['held_out_kl_after']:.4f} |")
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
