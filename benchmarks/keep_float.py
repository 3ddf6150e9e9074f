"""Which layer to keep float, and what it buys: ``vitq-onnx report`` picks, val measures.

    python benchmarks/keep_float.py -o benchmarks/results/keep_float.md

Exports DeiT-Ti at W4/A4 (repq, the project's default), reports every quantized tensor's error on
the calibration folder (the choice never sees val), then exports again keeping float the worst
tensor by SQNR against the FP model, the worst by its own quantizer's SQNR (the report's default
order), and the three worst by that together, and scores every model on all of val with ``vitq-onnx eval``; each keep-float model is
reported again to show its float layers. All through the CLI, as a user runs it; the base model's
SQNR plot lands beside the results (``keep_float_report.png``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from accuracy import CALIB, VAL, WEIGHTS

RUNS = Path("runs/keep_float")


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vitq_onnx.cli", *args], check=True)


def export(name: str, keep: list[str]) -> Path:
    out = RUNS / f"{name}.onnx"
    cli("export", "--model", "deit_t", "--bits", "4/4", "--weights", str(WEIGHTS["deit_t"]), "--calib", str(CALIB),
        "-q", "-o", str(out), *[a for p in keep for a in ("--keep-float", p)])
    return out


def evaluate(model: Path) -> dict:
    out = model.with_suffix(".eval.json")
    cli("eval", str(model), "--images", str(VAL), "--no-latency", "-q", "--json", str(out))
    return json.loads(out.read_text())


def report(model: Path, plot: Path | None = None) -> dict:
    out = model.with_suffix(".report.json")
    extra = ["--plot", str(plot)] if plot else []
    subprocess.run([sys.executable, "-m", "vitq_onnx.cli", "report", str(model), "--weights", str(WEIGHTS["deit_t"]),
                    "--images", str(CALIB), "-q", "--json", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def worst(rows: list[dict], key: str, n: int) -> list[dict]:
    return sorted((r for r in rows if r[key] is not None), key=lambda r: r[key])[:n]


def _names(names: list[str]) -> str:
    if len(names) > 3:
        return f"{len(names)} layers ({names[0]} … {names[-1]})"
    return ", ".join(names) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    for p in RUNS.glob("*"):
        p.unlink()
    base = export("w4a4", [])
    start = time.time()
    base_report = report(base, plot=args.output.with_name(args.output.stem + "_report.png"))
    report_seconds = time.time() - start
    rows = base_report["tensors"]
    by_sqnr, by_quant = worst(rows, "sqnr_db", 3), worst(rows, "quant_sqnr_db", 3)
    choices = {"none": [], "worst by SQNR against FP": [by_sqnr[0]["keep_float"]],
               "worst by own quantizer SQNR": [by_quant[0]["keep_float"]],
               "3 worst by own quantizer SQNR": list(dict.fromkeys(r["keep_float"] for r in by_quant)),
               "every block (a bound)": ["blocks.*"]}
    results = []
    for i, (label, keep) in enumerate(choices.items()):
        model = base if not keep else export(f"w4a4_keep{i}", keep)
        scores = evaluate(model)
        kept = report(model) if keep else base_report
        float_rows = [r for r in kept["tensors"] if r["kind"] == "float"]
        results.append((label, keep, scores, kept, float_rows))
        print(f"{label}: {keep} top-1 {scores['top1']:.2%}", file=sys.stderr)

    base_top1 = results[0][2]["top1"]
    lines = [
        "# Keeping the worst layer float (DeiT-Ti, W4/A4 repq)", "",
        f"`python benchmarks/keep_float.py -o {args.output}`. The report ran on {base_report['images']} images of "
        f"the calibration folder ({report_seconds:.1f} s with its plot, process start included); top-1 is on all "
        "val images (625), which chose nothing.", "",
        f"`vitq-onnx report` lists **{base_report['quantized_tensors']} quantized tensors**; output SQNR "
        f"{base_report['output']['sqnr_db']:.2f} dB. The three worst by each ranking:", "",
        "| ranking | module | tensor | kind | bits | SQNR vs FP dB | cosine | own quantizer SQNR dB | block SQNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {label} | {r['module']} | {r['tensor']} | {r['kind']} | {r['bits']} | {r['sqnr_db']:.2f} | "
          f"{r['cosine']:.4f} | {r['quant_sqnr_db']:.2f} | {r['block_sqnr_db']:.2f} |"
          for label, ranked in (("SQNR vs FP", by_sqnr), ("own quantizer SQNR", by_quant)) for r in ranked],
        "",
        "| kept float | `--keep-float` | val top-1 % | Δ top-1 | val top-5 % | MB | output SQNR dB (calib) | "
        "float rows in its report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, keep, scores, kept, float_rows in results:
        lines.append(
            f"| {label} | {' '.join(f'`{k}`' for k in keep) or '-'} | {100 * scores['top1']:.2f} | "
            f"{100 * (scores['top1'] - base_top1):+.2f} | {100 * scores['top5']:.2f} | "
            f"{scores['model_bytes'] / 2**20:.2f} | {kept['output']['sqnr_db']:.2f} | "
            f"{_names([r['module'] for r in float_rows])} |")
    args.output.write_text("\n".join(lines) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
