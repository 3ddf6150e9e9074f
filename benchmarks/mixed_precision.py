"""Greedy mixed precision on DeiT-Ti: ``vitq-onnx export --avg-bits B`` scored on val.

    python benchmarks/mixed_precision.py --avg-bits 5 4 -o benchmarks/results/mixed_precision.md

Each budget is exported through the CLI (``repq`` at the chosen map, widest 8/8, calibrated and
sensitivities measured on ../shared calib only) and scored with ``vitq-onnx eval`` on all of val;
the table gives the averages the greedy reached, the export time and the map's widths.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

from accuracy import CALIB, VAL, WEIGHTS

RUNS = Path("runs/mixed_precision")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avg-bits", nargs="+", type=float, required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    lines = ["# Greedy mixed precision on DeiT-Ti (`repq`, widest 8/8)", "",
             f"`python benchmarks/mixed_precision.py --avg-bits {' '.join(map(str, args.avg_bits))} -o {args.output}`; "
             "val top-1 on all 625 images.", "",
             "| --avg-bits | weight avg | activation avg | val top-1 % | val top-5 % | export s | layers per width |",
             "|---|---|---|---|---|---|---|"]
    for avg in args.avg_bits:
        out = RUNS / f"avg{avg:g}.onnx"
        for p in RUNS.glob(f"avg{avg:g}.*"):
            p.unlink()
        start = time.time()
        subprocess.run([sys.executable, "-m", "vitq_onnx.cli", "export", "--model", "deit_t", "--avg-bits", str(avg),
                        "--weights", str(WEIGHTS["deit_t"]), "--calib", str(CALIB), "-q", "-o", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
        scores = out.with_suffix(".eval.json")
        subprocess.run([sys.executable, "-m", "vitq_onnx.cli", "eval", str(out), "--images", str(VAL), "--no-latency",
                        "-q", "--json", str(scores)], check=True, stdout=subprocess.DEVNULL)
        result = json.loads(scores.read_text())
        mixed = json.loads(out.with_name(out.stem + ".recipe.json").read_text())["info"]["mixed_precision"]
        counts = collections.Counter(mixed["widths"].values())
        lines.append(f"| {avg:g} | {mixed['weight_avg']:.3f} | {mixed['activation_avg']:.3f} | "
                     f"{100 * result['top1']:.2f} | {100 * result['top5']:.2f} | {seconds:.0f} | "
                     + ", ".join(f"{w}: {counts[w]}" for w in sorted(counts, reverse=True)) + " |")
        print(lines[-1], file=sys.stderr)
    args.output.write_text("\n".join(lines) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
