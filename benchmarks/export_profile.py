"""Export time and memory against tokens and width: ``vitq-onnx export`` stage by stage.

    python benchmarks/export_profile.py -o benchmarks/results/export_profile.md

    python benchmarks/export_profile.py --configs vit_small_patch14_dinov2@518:4/4:method=repq-recon:budget=15 \
        -o benchmarks/results/export_profile_recon.md --append              # an optimizing method

Each config ``model[@img_size]:W/A[:real][:method=M][:budget=MIN]`` runs the CLI in its own
process, as a user runs it (imports included), with method M (default repq) and --time-budget
MIN; random weights unless ``real`` (DeiT-Ti from ../shared/models). The table gives the whole
command's seconds, the seconds of each stage (from the export's report), and the process's peak
memory (RSS); configs of an optimizing method a second table, with the iterations each block
trained (from the recipe) and the top-1 agreement with the FP model on the validation images.
Run it alone on the machine: the numbers are times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitq_onnx.latency import machine_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = {"deit_tiny_patch16_224": SHARED / "models" / "deit_tiny_patch16_224.safetensors"}
DINO = "vit_small_patch14_dinov2"
DEFAULT_CONFIGS = [
    "deit_tiny_patch16_224:8/8:real", "deit_tiny_patch16_224:4/4:real",
    f"{DINO}@224:8/8", f"{DINO}@224:4/4", f"{DINO}@336:8/8", f"{DINO}@336:4/4", f"{DINO}@518:8/8",
    f"{DINO}@518:4/4",
    "vit_tiny_patch16_224:4/4", "vit_small_patch16_224:4/4", "vit_base_patch16_224:8/8", "vit_base_patch16_224:4/4",
]


def run_config(config: str, calib: Path, work: Path) -> dict:
    """Export one config in a child process; its wall seconds, stage seconds and peak RSS (the
    export's own ``ru_maxrss``, from its report)."""
    model, bits, *flags = config.split(":")
    name, _, img_size = model.partition("@")
    settings = dict(f.split("=", 1) for f in flags if "=" in f)
    out = work / f"{config.replace('/', '').replace(':', '_').replace('@', '_').replace('=', '-')}.onnx"
    cmd = [sys.executable, "-m", "vitq_onnx.cli", "export", "--model", name, "--bits", bits, "--calib", str(calib),
           "-o", str(out), "-q", "--method", settings.get("method", "repq")]
    cmd += ["--weights", str(WEIGHTS[name])] if "real" in flags else ["--random-weights"]
    cmd += ["--img-size", img_size] if img_size else []
    cmd += ["--time-budget", settings["budget"]] if "budget" in settings else []
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, err = proc.communicate()
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    report = json.loads(stdout.strip().splitlines()[-1])
    peak = max(report["stage_peak_mb"].values())
    info = json.loads(out.with_suffix(".recipe.json").read_text())["info"]
    return {"config": config, "tokens": _tokens(name, img_size), "seconds": round(seconds, 1), "peak_mb": peak,
            "stages": report["stage_seconds"], "exact_images": report["exact_images"],
            "validated_images": report["images"], "method": settings.get("method", "repq"),
            "budget_min": float(settings["budget"]) if "budget" in settings else None,
            "fp_agreement": (f"{100 * report['fp_top1_agreement']:.1f} % top-1" if "fp_top1_agreement" in report
                             else f"cosine {report['fp_cosine_mean']:.4f}" if "fp_cosine_mean" in report else "—"),
            "iters": {stage: info[stage]["iters"] for stage in ("float_weight_reconstruction", "reconstruction")
                      if stage in info},
            "images": info["num_calib"],
            "batch_rows": {stage: [info[stage].get("budget_batch_size", info[stage]["batch_size"]),
                                   info[stage].get("budget_rows")] for stage in
                           ("float_weight_reconstruction", "reconstruction") if stage in info}}


def _tokens(name: str, img_size: str) -> int:
    import timm

    model = timm.create_model(name, pretrained=False, **({"img_size": int(img_size)} if img_size else {}))
    return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)


STAGES = [("load", "load model and images"), ("LN ranges", "calibration 1/3: channelwise_reparam"),
          ("weights", "calibration 2/3: fit_weights"), ("activations", "calibration 3/3: fit_activations"),
          ("FP32 ONNX", "FP32 ONNX export"), ("passes", "ONNX passes"), ("validation", "validation")]


def write_markdown(data: dict, output: Path) -> None:
    m = data["machine"]
    lines = [f"Export profile, {m['date']}, {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cpus']} logical "
             f"CPUs, onnxruntime {m['onnxruntime']}: whole `vitq-onnx export` (repq, default validation) per "
             "config, seconds per stage, peak RSS, share of the validation images on which onnxruntime and the "
             "simulation agree bit for bit.", "",
             "| config | tokens | total s | " + " | ".join(s for s, _ in STAGES) + " | peak MB | bit-exact images |",
             "|---|---|---|" + "---|" * len(STAGES) + "---|---|"]
    plain = [r for r in data["rows"] if not r.get("iters")]
    for r in plain:
        stages = " | ".join(f"{r['stages'].get(key, 0):.1f}" for _, key in STAGES)
        lines.append(f"| {r['config']} | {r['tokens']} | {r['seconds']:.1f} | {stages} | {r['peak_mb']} | "
                     f"{100 * r['exact_images']:.0f} % of {r['validated_images']} |")
    optimizing = [r for r in data["rows"] if r.get("iters")]
    if optimizing:
        lines = (lines if plain else lines[:1]) + [
            "", "Optimizing methods: seconds against the budget (the whole export), calibration's share, peak RSS, "
            "iterations each block trained (per reconstruction stage), top-1 agreement with the FP model on the "
            "validation images (a headless model: the mean cosine of its features); the calibration images, "
            "the batch and the token rows per image each stage trained on (all: every token).", "",
            "| config | tokens | method | budget s | total s | calibration s | after it s | peak MB | images "
            "| batch, rows | iterations per block | agree FP | bit-exact images |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in optimizing:
            calib = sum(v for k, v in r["stages"].items() if k.startswith("calibration"))
            after = sum(v for k, v in r["stages"].items() if k in ("FP32 ONNX export", "ONNX passes", "validation", "write"))
            iters = "; ".join(f"{stage.split('_')[0]}: {min(v)}–{max(v)}" for stage, v in r["iters"].items())
            budget = "—" if r["budget_min"] is None else f"{60 * r['budget_min']:.0f}"
            batch = "; ".join(f"{b}, {rows or 'all'}" for b, rows in r.get("batch_rows", {}).values()) or "—"
            lines.append(f"| {r['config']} | {r['tokens']} | {r['method']} | {budget} | {r['seconds']:.1f} "
                         f"| {calib:.1f} | {after:.1f} | {r['peak_mb']} | {r.get('images', '—')} | {batch} "
                         f"| {iters} | {r['fp_agreement']} "
                         f"| {100 * r['exact_images']:.0f} % of {r['validated_images']} |")
    output.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--calib", type=Path, default=SHARED / "data" / "imagenet-sample" / "calib")
    p.add_argument("-o", "--output", type=Path, required=True, help=".md (a .json beside it)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of the output's .json, a config run again replacing its row")
    args = p.parse_args(argv)
    data = {"machine": machine_info(len(os.sched_getaffinity(0))), "rows": []}
    if args.append and args.output.with_suffix(".json").is_file():
        data["rows"] = [r for r in json.loads(args.output.with_suffix(".json").read_text())["rows"]
                        if r["config"] not in args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            row = run_config(config, args.calib, Path(tmp))
            print(f"{config}: {row['seconds']} s, peak {row['peak_mb']} MB", file=sys.stderr)
            data["rows"].append(row)
    args.output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_markdown(data, args.output)


if __name__ == "__main__":
    main()
