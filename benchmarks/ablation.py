"""Ablation of the default (``--method auto``) at W4/A4 and W3/A3: each ingredient off, one at a time.

    python benchmarks/ablation.py -o benchmarks/results/ablation_auto.md
    python benchmarks/ablation.py --rows 4/4:default 4/4:no-fisher -o benchmarks/results/ablation_auto.md

Every row is a real export of DeiT-Ti (``vitq_onnx.export``, ``--format ort``, calibrated on all of
../shared calib, validated bit-exact on its 8 images), timed from the call to the written file,
then scored in onnxruntime on all of val. A row's method is ``auto``'s choice for the width with
one stage or setting changed (ROWS); each result is kept in the JSON beside the table as it comes,
and rows already there are not rerun (``--rerun`` does), so a long run can stop and go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime

import vitq_onnx
from vitq_onnx.calibration import stages
from vitq_onnx.calibration.methods import METHODS, REPQ_SOFTMAX, Method, auto_method, get_method
from vitq_onnx.calibration.reconstruct import BlockReconstruction
from vitq_onnx.cpu import cpu_info
from vitq_onnx.evaluate import evaluate

SHARED = Path(os.environ.get("VITQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"
FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni"}  # those the kernels differ by


def _replace_recon(stage_list, **changes):
    """The stages with every quantized-weight reconstruction changed."""
    return [dataclasses.replace(s, **changes) if isinstance(s, BlockReconstruction) and s.quantized_weights else s
            for s in stage_list]


def _without(stage_list, kind):
    return [s for s in stage_list if not isinstance(s, kind)]


def _softmax(stage_list, softmax_kind):
    return [dataclasses.replace(s, softmax_kind=softmax_kind) if isinstance(s, stages.FitActivations) else s
            for s in stage_list]


# (width, row) -> (what is off or changed, the stages from auto's method's stages)
ROWS = {
    ("4/4", "default"): ("nothing: `auto` (`repq-recon`)", lambda s: s),
    ("4/4", "no-recon"): ("block reconstruction (= `repq`)", lambda s: _without(s, BlockReconstruction)),
    ("4/4", "no-fisher"): ("the Fisher-weighted loss (plain MSE)", lambda s: _replace_recon(s, fisher=False)),
    ("4/4", "no-reparam"): ("RepQ-ViT's channel-wise reparameterization",
                            lambda s: _without(s, stages.ChannelwiseReparam)),
    ("4/4", "uniform-softmax"): ("the log√2 post-Softmax quantizer (uniform)",
                                 lambda s: _softmax(s, lambda bits: "uniform")),
    ("3/3", "default"): ("nothing: `auto` (`ias`)", lambda s: s),
    ("3/3", "no-recon"): ("both reconstruction stages (= `ias-sulq`)", lambda s: list(get_method("ias-sulq").stages)),
    ("3/3", "no-float-stage"): ("the float-weight stage (SOS stage 1; = `ias-stage3`)",
                                lambda s: list(get_method("ias-stage3").stages)),
    ("3/3", "no-fisher"): ("the Fisher-weighted loss in stage 3 (plain MSE)", lambda s: _replace_recon(s, fisher=False)),
    ("3/3", "no-sulq"): ("SULQ post-Softmax (RepQ-ViT's log√2)", lambda s: _softmax(s, REPQ_SOFTMAX)),
}


def run_row(width: str, row: str) -> dict:
    what, change = ROWS[(width, row)]
    base = auto_method(min(int(b) for b in width.split("/")))
    name = f"ablation-{width.replace('/', '-')}-{row}"
    METHODS[name] = Method(name, what, tuple(change(list(base.stages))), base.num_calib)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        start = time.time()
        exported = vitq_onnx.export("deit_t", width, CALIB, output=out, method=name, weights=WEIGHTS, progress=False)
        seconds = time.time() - start
        scored = evaluate(out, VAL, progress=False)
    report = exported.report
    return {"width": width, "row": row, "off": what, "method": base.name, "stages": [s.name for s in METHODS[name].stages],
            "top1": scored["top1"], "top5": scored["top5"], "images": scored["images"], "export_s": round(seconds, 1),
            "exact_images": report["exact_images"], "validated_images": report["images"]}


def write(rows: list[dict], output: Path) -> None:
    cpu = cpu_info()
    lines = ["# Ablation of the default at W4/A4 and W3/A3 (DeiT-Ti)", "",
             f"- CPU: {cpu.get('model name', platform.processor())}; flags: {', '.join(sorted(FLAGS & set(cpu.get('flags', '').split())))}; "
             f"{os.cpu_count()} logical CPUs; onnxruntime {onnxruntime.__version__}",
             "- each row a real export (`--format ort`, all 125 calib images), bit-exact against its simulation on "
             "its validation images, scored in onnxruntime on all val images; export s: the whole export, "
             "one at a time",
             "- command: `python benchmarks/ablation.py -o benchmarks/results/ablation_auto.md`", "",
             "| W/A | off (or changed) | method it changes | top-1 | top-5 | Δ top-1 vs default | images bit-exact | export s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        default = next((d for d in rows if d["width"] == r["width"] and d["row"] == "default"), None)
        delta = "—" if default is None or r is default else f"{100 * (r['top1'] - default['top1']):+.2f}"
        lines.append(f"| {r['width']} | {r['off']} | `{r['method']}` | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} "
                     f"| {delta} | {round(r['exact_images'] * r['validated_images'])}/{r['validated_images']} "
                     f"| {r['export_s']:.0f} |")
    output.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=[f"{w}:{r}" for w, r in ROWS], help="WIDTH:ROW, of " +
                    ", ".join(f"{w}:{r}" for w, r in ROWS))
    ap.add_argument("--rerun", action="store_true", help="run rows the JSON already has again")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    store = args.output.with_suffix(".json")
    done = json.loads(store.read_text()) if store.exists() else []
    for spec in args.rows:
        width, _, row = spec.partition(":")
        if (width, row) not in ROWS:
            raise SystemExit(f"unknown row '{spec}': use {', '.join(f'{w}:{r}' for w, r in ROWS)}")
        if not args.rerun and any(d["width"] == width and d["row"] == row for d in done):
            continue
        result = run_row(width, row)
        print(json.dumps(result), flush=True)
        done = [d for d in done if (d["width"], d["row"]) != (width, row)] + [result]
        order = list(ROWS)
        done.sort(key=lambda d: order.index((d["width"], d["row"])))
        store.write_text(json.dumps(done, indent=1))
        write(done, args.output)


if __name__ == "__main__":
    main()
