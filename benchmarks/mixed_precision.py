"""Greedy mixed precision on DeiT-Ti against uniform widths: top-1 against average bits (file size).

    python benchmarks/mixed_precision.py -o benchmarks/results/mixed_precision.md \
        --run "repq 8/8=--bits 8/8" "repq 4/4=--bits 4/4" "max-drop 1=--max-drop 1" \
        "avg 5, repq-recon=--avg-bits 5 --method repq-recon"

Each run (``label=export arguments``) is exported through the CLI (calibrated, and the bit map
chosen, on ../shared calib only) and scored with ``vitq-onnx eval`` on all of val; a run with
``--avg-bits`` or ``--max-drop`` is mixed, the others uniform. The table gives the averages
reached, the file size, the export time and the map's widths; the plot (``.png`` beside the
table) top-1 against the average weight width for both kinds (``--format ort`` files keep codes in
8-bit containers, so their size hardly moves with the width; ``qdq`` packs 4-bit weights).
``--update`` keeps an earlier table's rows, in place, and replaces (or adds) only the runs given:
for rows whose code did not change; a run stopped half-way leaves the earlier rows as they were.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from accuracy import CALIB, VAL, WEIGHTS

RUNS = Path("runs/mixed_precision")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", required=True, metavar="LABEL=ARGS")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--update", action="store_true", help="keep the earlier rows of --output not run again")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.output.with_suffix(".json").read_text()) if args.update else []
    for i, run in enumerate(args.run):
        label, _, extra = run.partition("=")
        out = RUNS / f"run{i}.onnx"
        for p in RUNS.glob(f"run{i}.*"):
            p.unlink()
        start = time.time()
        subprocess.run([sys.executable, "-m", "vitq_onnx.cli", "export", "--model", "deit_t", *shlex.split(extra),
                        "--weights", str(WEIGHTS["deit_t"]), "--calib", str(CALIB), "-q", "-o", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
        scores = out.with_suffix(".eval.json")
        subprocess.run([sys.executable, "-m", "vitq_onnx.cli", "eval", str(out), "--images", str(VAL), "--no-latency",
                        "-q", "--json", str(scores)], check=True, stdout=subprocess.DEVNULL)
        result = json.loads(scores.read_text())
        recipe = json.loads(out.with_name(out.stem + ".recipe.json").read_text())
        mixed = recipe["info"].get("mixed_precision")
        row = {"label": label, "args": extra, "mixed": mixed is not None, "method": recipe["method"],
               "weight_avg": mixed["weight_avg"] if mixed else recipe["info"]["bits"]["w"],
               "activation_avg": mixed["activation_avg"] if mixed else recipe["info"]["bits"]["a"],
               "top1": result["top1"], "top5": result["top5"], "model_bytes": result["model_bytes"],
               "export_s": round(seconds),
               "widths": {part: dict(collections.Counter(w for k, w in (mixed["widths"] if mixed else {}).items()
                                                         if k.endswith(":" + part))) for part in "wa"},
               **({"held_out": {k: mixed[k] for k in ("held_out_images", "held_out_fp_top1", "held_out_drop")}}
                  if mixed and "max_drop" in mixed else {}), "map": mixed["widths"] if mixed else None}
        labels = [r["label"] for r in rows]
        if label in labels:
            rows[labels.index(label)] = row
        else:
            rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "map"}), file=sys.stderr)
        write(rows, args.output)
    plot(rows, args.output.with_suffix(".png"))


def write(rows: list[dict], output: Path) -> None:
    output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# Greedy mixed precision against uniform widths on DeiT-Ti", "",
             "`python benchmarks/mixed_precision.py` (arguments in the table); val top-1 on all 625 images; "
             "FP32 79.52 %.", "",
             "| run | export arguments | method | weight avg | activation avg | file MB | val top-1 % | val top-5 % "
             "| export s | modules per width (weights · activations) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = " · ".join(f"{part.upper()} " + ", ".join(f"{w}: {n}" for w, n in sorted(c.items(), key=lambda x: -int(x[0])))
                            for part, c in r["widths"].items()) if r["mixed"] else "uniform"
        lines.append(f"| {r['label']} | `{r['args']}` | {r['method']} | {r['weight_avg']:.3f} | {r['activation_avg']:.3f} "
                     f"| {r['model_bytes'] / 1e6:.2f} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | {r['export_s']} "
                     f"| {counts} |")
    output.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mixed, style in ((False, "o"), (True, "s")):
        pts = [r for r in rows if r["mixed"] == mixed]
        ax.scatter([r["weight_avg"] for r in pts], [100 * r["top1"] for r in pts], marker=style,
                   label="mixed precision" if mixed else "uniform W/A")
        for r in pts:  # labels left of the points near the right edge, right of the others
            right = r["weight_avg"] > 7
            ax.annotate(r["label"], (r["weight_avg"], 100 * r["top1"]), fontsize=7, ha="right" if right else "left",
                        xytext=(-6 if right else 6, -12 if mixed else 4), textcoords="offset points")
    ax.axhline(79.52, color="gray", ls="--", lw=0.8, label="FP32")
    ax.set_xlabel("average weight bits (parameter-weighted)")
    ax.set_ylabel("val top-1 % (625 images)")
    ax.set_title("DeiT-Ti: top-1 against average bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
