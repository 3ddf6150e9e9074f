"""Speed vs accuracy of DeiT-Ti in onnxruntime: FP32, onnxruntime's quantize_static and vitq-onnx.

    python benchmarks/speed.py -o benchmarks/results/speed.md                  # all models, ~30 min on 2 cores
    python benchmarks/speed.py --reuse -o benchmarks/results/speed.md          # rerun, keeping built models
    python benchmarks/speed.py --val-limit 32 --rounds 2 --runs-per-block 3 \\
        --configs ort-w8a8 vitq-w4a4-ort -o runs/speed/try.md                  # quick try

Writes the markdown table to -o, with the raw numbers in .json and a plot in .png beside it
(the plot needs matplotlib: ``pip install -e '.[bench]'``). Models, built into --work:

  fp32                the FP32 graph every vitq-onnx export starts from (``export_fp32``)
  ort-w8a8, ort-w4a4  ``onnxruntime.quantization.quantize_static`` after ``quant_pre_process``:
                      QDQ, per-channel weights, QUInt8/QInt8 (QUInt4/QInt4, opset 21) activations/
                      weights, calibrated with MinMax and with Percentile on the same 32 images
                      vitq-onnx uses; the better of the two on val top-1 is kept (and named)
  vitq-wXaX-{ort,qdq} ``vitq-onnx export --bits X/X --format ort|qdq``, timed as a user runs it
  vitq-w8a8-ort-vnni  the same with ``--target-cpu vnni`` (full-range s8 operands; on a CPU without
                      VNNI/AMX the export refuses, and the row says so)

Each model is scored on val (top-1, and top-1 agreement with FP32's predictions). Latency: one
onnxruntime CPU session per model (intra-op threads --threads, inter-op 1, default graph
optimizations), fed a fixed batch of real calibration images. After warm-up, each of --rounds
rounds times a block of --runs-per-block runs of every model in turn (the order rotates each round)
and keeps the block's median; a model's latency is the median over rounds and its ratio to FP32 is
the median over rounds of (its block median / FP32's block median in the same round), which
cancels most of the drift of a noisy machine. Export times: vitq-onnx is the whole CLI command
(imports, calibration, validation); onnxruntime is pre-processing + calibration + quantization and
FP32 is the torch -> ONNX export, both in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from vitq_onnx import runtime, runtimes
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.latency import machine_info, measure_latency, median_ms, ratio
from vitq_onnx.images import (
    Preprocess,
    label_of,
    list_images,
    load_images,
    load_synsets,
)
from vitq_onnx.models import create_model
from vitq_onnx.images import calibration_subset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQ_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"
NUM_CALIB = 32
BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # fp32 | ort | vitq
    bits: str = ""  # W/A
    fmt: str = ""  # vitq-onnx --format
    target_cpu: str = "portable"  # vitq-onnx --target-cpu
    method: str = "repq"  # vitq-onnx --method


CONFIGS = {c.name: c for c in [
    Config("fp32", "fp32"),
    Config("ort-w8a8", "ort", "8/8"),
    Config("ort-w4a4", "ort", "4/4"),
    *(Config(f"vitq-w{b}a{b}-{f}", "vitq", f"{b}/{b}", f) for b in (8, 6, 4) for f in ("ort", "qdq")),
    Config("vitq-w8a8-ort-vnni", "vitq", "8/8", "ort", "vnni"),  # CPUs with VNNI/AMX only (below 8 bits: the same)
    Config("vitq-w6a6-ias-ort", "vitq", "6/6", "ort", method="ias"),  # log2-table post-Softmax
]}
ORT_CALIBRATIONS = ("MinMax", "Percentile")


@dataclass
class Build:
    """One built model file (or why it could not be built)."""

    name: str
    path: str
    export_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- building

def cached(work: Path, name: str, reuse: bool, build) -> Build:
    """``build()`` unless --reuse and a finished build of ``name`` is recorded in ``work``."""
    record = work / f"{name}.build.json"
    if reuse and record.is_file():
        done = Build(**json.loads(record.read_text()))
        if done.error is None and Path(done.path).is_file():
            print(f"[{name}] reusing {done.path}", file=sys.stderr)
            return done
    print(f"[{name}] building", file=sys.stderr)
    result = build()
    record.write_text(json.dumps(asdict(result), indent=1))
    took = "failed: " + result.error if result.error else f"{result.export_s:.1f} s"
    print(f"[{name}] {took}", file=sys.stderr)
    return result


def build_fp32(fp_model, preprocess: Preprocess, out: Path) -> Build:
    start = time.time()
    model = export_fp32(fp_model, preprocess.size)
    runtime.set_metadata(model, runtime.META_PREPROCESS, preprocess.to_dict())
    onnx.save(model, out)
    return Build("fp32", str(out), round(time.time() - start, 1), notes=["vitq-onnx's FP32 graph (export_fp32)"])


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 8):
        self._it = iter([{input_name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._it, None)


@contextlib.contextmanager
def _quiet():
    """quantize_static warns once per LayerNorm weight ('Axis 1 is out-of-range') and prints its
    Percentile settings; hide both."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def build_ort(config: Config, calibration: str, fp32: Path, calib_images: np.ndarray, out: Path) -> Build:
    """onnxruntime's own static QDQ quantization of the FP32 graph."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"8/8": (QuantType.QUInt8, QuantType.QInt8), "4/4": (QuantType.QUInt4, QuantType.QInt4)}
    activation_type, weight_type = types[config.bits]
    build = Build(f"{config.name}-{calibration.lower()}", str(out))
    start = time.time()
    try:
        prepared = out.with_name(out.stem + ".prep.onnx")
        quant_pre_process(str(fp32), str(prepared))
        input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
        with _quiet():
            quantize_static(str(prepared), str(out), _Batches(calib_images, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=activation_type,
                            weight_type=weight_type, calibrate_method=getattr(CalibrationMethod, calibration))
        prepared.unlink()
    except Exception as exc:  # noqa: BLE001 - a failure goes into the table, the benchmark goes on
        build.error = _one_line(exc)
    build.export_s = round(time.time() - start, 1)
    build.notes.append(f"{calibration} calibration")
    return build


def build_vitq(config: Config, out: Path) -> Build:
    """``vitq-onnx export``, timed as a user runs it (interpreter start and imports included)."""
    args = [sys.executable, "-m", "vitq_onnx.cli", "export", "--model", "deit_t", "--bits", config.bits,
            "--format", config.fmt, "--target-cpu", config.target_cpu, "--method", config.method, "--weights", str(WEIGHTS), "--calib", str(CALIB),
            "--num-calib", str(NUM_CALIB), "-o", str(out), "-q"]
    start = time.time()
    proc = subprocess.run(args, check=False, capture_output=True, text=True, cwd=REPO)
    build = Build(config.name, str(out), round(time.time() - start, 1))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
        build.error = lines[-1].removeprefix("vitq-onnx: error: ")[:300]
    return build


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# -------------------------------------------------------------------------------------- accuracy

def load_val(preprocess: Preprocess, limit: int) -> tuple[np.ndarray, np.ndarray]:
    paths = list_images(VAL)[: limit or None]
    images, kept = load_images(paths, preprocess)
    synsets = load_synsets()
    return images, np.array([label_of(p, VAL, synsets) for p in kept])


def predict(path: str, images: np.ndarray, threads: int) -> np.ndarray:
    sess = runtime.session(path, threads=threads)
    name = sess.get_inputs()[0].name
    batches = range(0, len(images), 32)
    return np.concatenate([sess.run(None, {name: images[i:i + 32]})[0].argmax(1)
                           for i in tqdm(batches, desc=f"scoring {Path(path).stem}", leave=False)])


def score(build: Build, images: np.ndarray, labels: np.ndarray, fp32_pred: np.ndarray | None,
          threads: int) -> dict:
    """top-1 and agreement with FP32 (keys absent when the model cannot run)."""
    if build.error:
        return {}
    try:
        pred = predict(build.path, images, threads)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run goes into the table
        build.error = _one_line(exc)
        return {}
    result = {"top1": float((pred == labels).mean()), "pred": pred}
    if fp32_pred is not None:
        result["agreement"] = float((pred == fp32_pred).mean())
    return result


def pick_ort(candidates: list[Build], scores: list[dict]) -> tuple[Build, dict]:
    """The calibration with the best val top-1; the others' top-1 goes into the notes."""
    ranked = sorted(zip(candidates, scores), key=lambda c: c[1].get("top1", -1), reverse=True)
    best, best_score = ranked[0]
    for other, other_score in ranked[1:]:
        what = f"{100 * other_score['top1']:.2f}" if "top1" in other_score else f"failed ({other.error})"
        best.notes.append(f"{other.notes[0]}: top-1 {what}")
    return best, best_score


def build_and_score(config: Config, args, fp32: Build, calib_images, val_images, labels, fp32_pred):
    """Build one config (for onnxruntime: every calibration, keeping the best) and score it on val."""
    work = args.work
    if config.kind == "vitq":
        out = work / f"{config.name}.onnx"
        build = cached(work, config.name, args.reuse, partial(build_vitq, config, out))
        return build, score(build, val_images, labels, fp32_pred, args.threads)
    candidates, scores = [], []
    for calibration in ORT_CALIBRATIONS:
        name = f"{config.name}-{calibration.lower()}"
        build = cached(work, name, args.reuse, partial(build_ort, config, calibration, Path(fp32.path),
                                                       calib_images, work / f"{name}.onnx"))
        candidates.append(build)
        scores.append(score(build, val_images, labels, fp32_pred, args.threads))
    return pick_ort(candidates, scores)


# --------------------------------------------------------------------------------------- latency

def latency_columns(blocks: dict[str, dict], name: str) -> dict:
    out, ms, ratios = {}, median_ms(blocks, name), ratio(blocks, name, "fp32")
    for batch, block_ms in blocks[name].items():
        out[f"b{batch}_ms"], out[f"b{batch}_ratio"] = ms[batch], ratios[batch]
        out[f"b{batch}_block_ms"] = [round(m, 3) for m in block_ms]
    return out


# --------------------------------------------------------------------------------------- reports

def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def write_markdown(data: dict, output: Path) -> None:
    m, s = data["machine"], data["settings"]
    lines = [
        "# DeiT-Ti in onnxruntime: speed vs accuracy", "",
        (f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs); onnxruntime {m['onnxruntime']}, "
         f"{m['provider']}, intra-op threads {m['intra_op_threads']}, inter-op {m['inter_op_threads']}, "
         "default graph optimizations"),
        f"- val images: {s['val_images']}; calibration: the same {NUM_CALIB} images for every quantized model",
        (f"- latency: median over {s['rounds']} rounds of the median of {s['runs_per_block']} runs, models "
         "interleaved within each round; × FP32 is the median of the per-round ratios"),
        f"- command: `{s['command']}` ({m['date']})", "",
        ("| model | W/A | format | top-1 | agree FP32 | b1 ms | b1 × FP32 | b8 ms | b8 × FP32 | MB | size × FP32 "
         "| export s | notes |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        notes = "; ".join(r["notes"] + ([f"**error**: {r['error']}"] if r["error"] else []))
        lines.append(
            f"| {r['name']} | {r['bits'] or '32/32'} | {r['format']} | {_pct(r.get('top1'))} "
            f"| {_pct(r.get('agreement'))} | {_num(r.get('b1_ms'), '.1f')} | {_num(r.get('b1_ratio'), '.2f')} "
            f"| {_num(r.get('b8_ms'), '.1f')} | {_num(r.get('b8_ratio'), '.2f')} | {_num(r.get('size_mb'), '.2f')} "
            f"| {_num(r.get('size_ratio'), '.2f')} | {_num(r.get('export_s'), '.1f')} | {notes} |")
    output.write_text("\n".join(lines) + "\n")


def write_plot(data: dict, path: Path) -> None:
    try:
        from plot_speed import plot
    except ImportError as exc:
        print(f"no plot ({exc}): pip install -e '.[bench]'", file=sys.stderr)
        return
    plot(data, path)


def row_of(config: Config, build: Build, result: dict, fp32_size: int | None) -> dict:
    size = Path(build.path).stat().st_size if not build.error and Path(build.path).is_file() else None
    return {
        "name": config.name, "kind": config.kind, "bits": config.bits,
        "format": {"fp32": "float", "ort": "QDQ (quantize_static)"}.get(config.kind, config.fmt),
        "file": build.path, "export_s": build.export_s, "error": build.error, "notes": build.notes,
        "top1": result.get("top1"), "agreement": result.get("agreement"),
        "size_mb": None if size is None else size / 1e6,
        "size_ratio": None if size is None or not fp32_size else size / fp32_size,
    }


# ------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help=f"models to compare (fp32 is always included): {' '.join(CONFIGS)}")
    p.add_argument("--work", type=Path, default=Path("runs/speed"), help="where the models are built")
    p.add_argument("--reuse", "--skip-export", action="store_true",
                   help="reuse models already built in --work (and their recorded export time)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs-per-block", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--val-limit", type=int, default=0, help="score on the first N val images only")
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/speed.md"),
                   help="markdown table; .json and .png are written beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = [CONFIGS["fp32"]] + [CONFIGS[n] for n in dict.fromkeys(args.configs) if n != "fp32"]
    args.work.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    fp_model = create_model("deit_t", WEIGHTS)
    preprocess = Preprocess.from_model(fp_model)
    calib_images, _ = load_images(calibration_subset(list_images(CALIB), NUM_CALIB), preprocess)
    val_images, labels = load_val(preprocess, args.val_limit)
    print(f"{len(val_images)} val images, {len(calib_images)} calibration images", file=sys.stderr)

    fp32 = cached(args.work, "fp32", args.reuse, partial(build_fp32, fp_model, preprocess, args.work / "fp32.onnx"))
    fp32_result = score(fp32, val_images, labels, None, args.threads)
    if fp32.error:
        sys.exit(f"the FP32 model failed: {fp32.error}")
    builds, results = {"fp32": fp32}, {"fp32": fp32_result}
    for config in configs[1:]:
        builds[config.name], results[config.name] = build_and_score(
            config, args, fp32, calib_images, val_images, labels, fp32_result["pred"])

    runnable = {name: b.path for name, b in builds.items() if not b.error}
    inputs = {b: calib_images[:b] for b in BATCH_SIZES}
    runners = {name: runtimes.load(path, threads=args.threads) for name, path in runnable.items()}
    blocks = measure_latency(runners, inputs, args.rounds, args.runs_per_block)

    fp32_size = Path(fp32.path).stat().st_size
    rows = []
    for config in configs:
        row = row_of(config, builds[config.name], results[config.name], fp32_size)
        if config.name in blocks:
            row.update(latency_columns(blocks, config.name))
        rows.append(row)
    data = {"machine": machine_info(args.threads),
            "settings": {"command": " ".join(["python", *sys.argv]), "val_images": len(val_images),
                         "calib_images": len(calib_images), "rounds": args.rounds,
                         "runs_per_block": args.runs_per_block, "batch_sizes": list(BATCH_SIZES)},
            "rows": rows}
    args.output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_markdown(data, args.output)
    write_plot(data, args.output.with_suffix(".png"))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
