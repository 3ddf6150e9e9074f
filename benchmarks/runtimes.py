"""DeiT-Ti at each width in onnxruntime (``ort`` and ``qdq`` files) and OpenVINO (``openvino`` files).

    python benchmarks/runtimes.py -o benchmarks/results/runtimes.md              # repq 8, 6, 4, 3 bits
    python benchmarks/runtimes.py --ias -o benchmarks/results/runtimes.md        # and ias at 4/4, 3/3
    python benchmarks/runtimes.py --reuse -o benchmarks/results/runtimes.md      # keep built models, scores

One calibration per (method, width): ``vitq-onnx export --format ort``, then the same recipe
redeployed with ``--recipe`` as ``qdq`` and ``openvino``, so the three files differ only in their
graph forms. Each file is scored on every val image in its runtime with ``vitq-onnx eval``'s code
(``evaluate``); an ``openvino`` file also in onnxruntime, with the top-1 agreement and largest
logit difference of the two runtimes. Latency at batch 1 (and --batch): every model in its runtime,
FP32 in both, all interleaved in one measurement (latency.py), each quantized model against its own
runtime's FP32; OpenVINO runs in float32 (runtimes.OPENVINO_CONFIG). The W8/A8 row with
``--target-cpu vnni`` is onnxruntime's fastest W8/A8 on CPUs with VNNI or AMX. Writes the table to
-o and the raw numbers beside it (.json).
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

from vitq_onnx import runtimes
from vitq_onnx.cpu import has_int8_dot
from vitq_onnx.evaluate import evaluate
from vitq_onnx.latency import machine_info, measure_latency, median_ms, ratio

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQ_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"
FORMATS = {"ort": "onnxruntime", "qdq": "onnxruntime", "openvino": "openvino"}  # format -> the runtime it runs in


def export(out: Path, bits: str, method: str, fmt: str, recipe: Path | None, target_cpu: str = "portable",
           save_passes: Path | None = None) -> float:
    """``vitq-onnx export`` as a user runs it; the seconds it took."""
    args = [sys.executable, "-m", "vitq_onnx.cli", "export", "--model", "deit_t", "--format", fmt,
            "--target-cpu", target_cpu, "--weights", str(WEIGHTS), "--calib", str(CALIB), "-o", str(out), "-q"]
    args += ["--recipe", str(recipe)] if recipe else ["--bits", bits, "--method", method]
    args += ["--save-passes", str(save_passes)] if save_passes else []
    start = time.time()
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"export {out.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return round(time.time() - start, 1)


def built(out: Path, reuse: bool, make) -> float | None:
    """``make()``'s export seconds, or with --reuse those recorded when ``out`` was built."""
    record = out.with_suffix(".build.json")
    if reuse and out.is_file():
        return json.loads(record.read_text())["export_s"] if record.is_file() else None
    seconds = make()
    record.write_text(json.dumps({"export_s": seconds}))
    return seconds


def build(work: Path, reuse: bool, ias: bool) -> list[dict]:
    """Every model file: FP32, and (method, width) x format."""
    fp32 = work / "passes" / "00_fp32.onnx"
    models = []
    cases = [("repq", b) for b in (8, 6, 4, 3)] + ([("ias", b) for b in (4, 3)] if ias else [])
    for method, b in cases:
        bits = f"{b}/{b}"
        recipe = None
        for fmt in FORMATS:
            out = work / f"{method}_w{b}a{b}_{fmt}.onnx"
            seconds = built(out, reuse, lambda: export(out, bits, method, fmt, recipe,
                                                       save_passes=work / "passes" if not fp32.is_file() else None))
            recipe = out.with_suffix(".recipe.json")
            models.append({"name": out.stem, "path": out, "method": method, "bits": bits, "format": fmt,
                           "runtime": FORMATS[fmt], "export_s": seconds})
    if has_int8_dot():
        out = work / "repq_w8a8_ort_vnni.onnx"
        seconds = built(out, reuse, lambda: export(out, "8/8", "repq", "ort", None, "vnni"))
        models.append({"name": out.stem, "path": out, "method": "repq", "bits": "8/8", "format": "ort vnni",
                       "runtime": "onnxruntime", "export_s": seconds})
    fps = [{"name": f"fp32_{r}", "path": fp32, "method": "-", "bits": "32/32", "format": "fp32", "runtime": r,
            "export_s": None} for r in ("onnxruntime", "openvino")]
    return fps + models


def score(m: dict, record: Path, reuse: bool) -> dict:
    """Val top-1 of one model in its runtime (for OpenVINO also in onnxruntime, with the agreement),
    and its size; kept beside the model, and read back with --reuse when the model is older."""
    if reuse and record.is_file() and record.stat().st_mtime > Path(m["path"]).stat().st_mtime:
        return json.loads(record.read_text())
    print(f"scoring {m['name']} in {m['runtime']}", flush=True)
    result = evaluate(m["path"], VAL, progress=False, runtime_name=m["runtime"])
    row = {"top1": result["top1"], "size_mb": Path(m["path"]).stat().st_size / 2**20}
    if "onnxruntime" in result:
        ref = result["onnxruntime"]
        row.update(ort_top1=ref["top1"], ort_agreement=ref["top1_agreement"],
                   ort_max_diff=ref["max_abs_output_difference"])
    record.write_text(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "runtimes")
    p.add_argument("--reuse", action="store_true", help="keep model files (and their scores) already in --work")
    p.add_argument("--ias", action="store_true", help="also ias at 4/4 and 3/3 (about 15 minutes each)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs-per-block", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="second latency batch size (1 always)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    models = build(args.work, args.reuse, args.ias)

    for m in models:
        m.update(score(m, args.work / f"{m['name']}.score.json", args.reuse))

    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    runners = {m["name"]: runtimes.load(m["path"], m["runtime"], args.threads) for m in models}
    blocks = measure_latency(runners, {1: x[:1], args.batch: x}, args.rounds, args.runs_per_block)
    for m in models:
        m["latency_ms"] = {str(b): round(ms, 3) for b, ms in median_ms(blocks, m["name"]).items()}
        m["x_fp32"] = {str(b): round(r, 4) for b, r in ratio(blocks, m["name"], f"fp32_{m['runtime']}").items()}
        m["x_ort_fp32"] = {str(b): round(r, 4) for b, r in ratio(blocks, m["name"], "fp32_onnxruntime").items()}
        m["path"] = str(m["path"])
    data = {"machine": {**machine_info(args.threads, "openvino")}, "models": models,
            "settings": {"rounds": args.rounds, "runs_per_block": args.runs_per_block, "batch": args.batch,
                         "command": "python benchmarks/runtimes.py " + " ".join(argv or sys.argv[1:])}}
    fastest_ort_w8 = min((m for m in models if m["bits"] == "8/8" and m["runtime"] == "onnxruntime"),
                         key=lambda m: m["latency_ms"]["1"])
    ov_w8 = next(m for m in models if m["bits"] == "8/8" and m["runtime"] == "openvino" and m["method"] == "repq")
    data["openvino_w8a8_vs_onnxruntime_fastest_w8a8"] = {
        "fastest": fastest_ort_w8["name"],
        **{str(b): round(r, 4) for b, r in ratio(blocks, ov_w8["name"], fastest_ort_w8["name"]).items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    write_markdown(data, args.output)
    print(args.output.read_text())


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def write_markdown(data: dict, output: Path) -> None:
    m, s, b = data["machine"], data["settings"], data["settings"]["batch"]
    vs = data["openvino_w8a8_vs_onnxruntime_fastest_w8a8"]
    lines = [
        "# DeiT-Ti in onnxruntime and OpenVINO, each against its own FP32", "",
        f"- CPU: {m['cpu']}, flags {', '.join(m['cpu_flags'])}; {m['logical_cpus']} logical CPUs, "
        f"{m['intra_op_threads']} threads; onnxruntime {m['onnxruntime']}, OpenVINO {m['openvino']} "
        f"(CPU plugin, {m['config']})",
        f"- top-1 on all val images; latency: median over {s['rounds']} rounds of the median of "
        f"{s['runs_per_block']} runs, every model interleaved; × FP32: the median per-round ratio to FP32 "
        "in the same runtime",
        f"- command: `{s['command']}` ({m['date']})", "",
        f"| method | W/A | file | runtime | top-1 | top-1 in onnxruntime | agreement with onnxruntime "
        f"| max abs logit diff | b1 ms | b1 × FP32 | b{b} ms | b{b} × FP32 | MB | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["models"]:
        twin = "ort_top1" in r  # an OpenVINO run, with its file's onnxruntime run beside it
        cells = [r["method"], r["bits"], r["format"], r["runtime"], _pct(r["top1"]), _pct(r.get("ort_top1")),
                 _pct(r.get("ort_agreement")), f"{r['ort_max_diff']:.3g}" if twin else "—",
                 f"{r['latency_ms']['1']:.1f}", f"{r['x_fp32']['1']:.2f}", f"{r['latency_ms'][str(b)]:.1f}",
                 f"{r['x_fp32'][str(b)]:.2f}", f"{r['size_mb']:.2f}", str(r["export_s"] or "—")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"OpenVINO W8/A8 (`openvino` file) against onnxruntime's fastest W8/A8 here ({vs['fastest']}), "
              f"interleaved: batch 1 {vs['1']:.2f}×, batch {b} {vs[str(b)]:.2f}×."]
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
