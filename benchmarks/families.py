"""Every model family at W8/A8 and W4/A4 in both formats: exported, bit-exact, how far from FP.

    python benchmarks/families.py -o benchmarks/results/families.md
    python benchmarks/families.py --only beit,eva02 --reuse -o benchmarks/results/families.md

Per model (random weights, except DeiT-Ti's real ones) and width: ``vitq-onnx export --method repq
--format ort`` calibrates on ../shared calib, then the same recipe is redeployed with ``--recipe`` as
``qdq``. Each file: its export's own validation against the simulation (top-1 agreement, largest
logit difference, exact images), the float activation-by-activation MatMuls left in its graph
(``passes/float_matmuls.py``), and against the FP model on 16 calibration images: the output
cosine, and the error relative to the spread of the FP outputs between images
(||q - fp|| / ||fp - mean(fp)||): with random weights and LayerScale initialised small, every
image gets nearly the same output and the cosine says little; this ratio still shows quantization
noise. Hugging Face towers are built from random configs at DeiT-Ti's size (width 192, 12 blocks,
3 heads, 224 px), classification and headless. Writes the table to -o and the numbers beside it.
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
import onnx
import onnx_graphsurgeon as gs

from vitq_onnx import runtime
from vitq_onnx.images import Preprocess, calibration_subset, list_images, load_images
from vitq_onnx.latency import machine_info
from vitq_onnx.passes.float_matmuls import float_products
from vitq_onnx.runtime import file_metadata

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQ_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
COSINE_IMAGES = 16

# label -> (--model, family, note)
TIMM = {
    "deit_t": ("deit_t", "vit", "real weights"),
    "swin_t": ("swin_t", "swin", ""),
    "beit": ("beit_base_patch16_224", "beit", ""),
    "eva02": ("eva02_tiny_patch14_224", "eva", ""),
    "swinv2": ("swinv2_tiny_window8_256", "swin_v2", ""),
    "tiny_vit": ("tiny_vit_5m_224", "tiny_vit", ""),
    "cait": ("cait_xxs24_224", "cait", ""),
    "pvt_v2": ("pvt_v2_b0", "pvt_v2", ""),
    "siglip": ("vit_base_patch16_siglip_224", "vit + siglip", ""),
}
HF = ("ViTForImageClassification", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel")


def hf_folder(root: Path, architecture: str) -> Path:
    """A save_pretrained folder of ``architecture`` with random weights at DeiT-Ti's size."""
    import torch
    import transformers as T

    folder = root / architecture
    if (folder / "config.json").is_file():
        return folder
    size = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, image_size=224, patch_size=16)
    config, processor = {
        "ViTForImageClassification": (T.ViTConfig(intermediate_size=768, num_labels=1000, **size),
                                      T.ViTImageProcessor(size={"height": 224, "width": 224})),
        "Dinov2Model": (T.Dinov2Config(mlp_ratio=4, **size),
                        T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})),
        "CLIPVisionModel": (T.CLIPVisionConfig(intermediate_size=768, **size),
                            T.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
        "SiglipVisionModel": (T.SiglipVisionConfig(intermediate_size=768, **size),
                              T.SiglipImageProcessor(size={"height": 224, "width": 224})),
    }[architecture]
    torch.manual_seed(0)
    getattr(T, architecture)(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def export(model: str, out: Path, bits: str, fmt: str, recipe: Path | None) -> tuple[dict, float]:
    """``vitq-onnx export`` as a user runs it: its JSON report and seconds."""
    args = [sys.executable, "-m", "vitq_onnx.cli", "export", "--model", model, "--format", fmt,
            "--calib", str(CALIB), "-o", str(out)]
    args += ["--weights", str(WEIGHTS)] if model == "deit_t" else ["--random-weights"]
    args += ["--recipe", str(recipe)] if recipe else ["--bits", bits, "--method", "repq"]
    start = time.time()
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}, round(time.time() - start, 1)
    return json.loads(done.stdout.strip().splitlines()[-1]), round(time.time() - start, 1)


def fp_outputs(model: str, images: np.ndarray) -> np.ndarray:
    """The FP model's outputs, built as the export builds it (same seed for random weights)."""
    import torch

    from vitq_onnx.models import build_model

    net = build_model(model, WEIGHTS if model == "deit_t" else None, model != "deit_t")[0]
    with torch.no_grad():
        return net(torch.from_numpy(images)).numpy()


def compare(quantized: np.ndarray, fp: np.ndarray) -> dict:
    q, f = quantized.reshape(len(fp), -1).astype(np.float64), fp.reshape(len(fp), -1).astype(np.float64)
    cos = (q * f).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(f, axis=1)
    spread = np.linalg.norm(f - f.mean(0))
    return {"fp_cosine_mean": round(float(cos.mean()), 5), "fp_cosine_min": round(float(cos.min()), 5),
            "error_over_spread": round(float(np.linalg.norm(q - f) / max(spread, 1e-30)), 4)}


def run_model(label: str, model: str, work: Path, reuse: bool) -> list[dict]:
    record = work / f"{label}.json"
    if reuse and record.is_file():
        return json.loads(record.read_text())
    rows, fp, images = [], None, None
    for bits in ("8/8", "4/4"):
        recipe = None
        for fmt in ("ort", "qdq"):
            out = work / f"{label}_{bits.replace('/', '')}_{fmt}.onnx"
            report, seconds = export(model, out, bits, fmt, recipe)
            row = {"model": label, "bits": bits, "format": fmt, "export_s": seconds, **report}
            if "error" not in report:
                recipe = out.with_suffix(".recipe.json")
                meta = file_metadata(out)
                if images is None:
                    pre = Preprocess.from_dict(meta["vitq.preprocess"])
                    images = load_images(calibration_subset(list_images(CALIB), COSINE_IMAGES), pre)[0]
                    fp = fp_outputs(model, images)
                kept = set(meta["vitq.recipe"].get("float_layers", []))
                row.update(file_mb=round(out.stat().st_size / 2**20, 2),
                           float_act_matmuls=len(float_products(gs.import_onnx(onnx.load(out)))),
                           kept_float=sorted(kept),
                           **compare(runtime.run(runtime.session(out), images), fp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    record.write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | W/A | format | validated: agreement / max \\|Δlogit\\| / exact | float act×act MatMuls | "
            "cosine to FP (mean / min) | error / spread | export s | MB |\n|---|---|---|---|---|---|---|---|---|")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['bits']} | {r['format']} | **failed**: {r['error']} | | | | "
                         f"{r['export_s']} | |")
            continue
        agree = r.get("top1_agreement")
        check = (f"{agree:.2%} / {r['max_abs_logit_error']:.4g} / {r['exact_images']:.0%}" if agree is not None else
                 f"features / {r['sim_max_abs_error']:.4g} / {r['exact_images']:.0%}")
        lines.append(f"| {r['model']} | {r['bits']} | {r['format']} | {check} | {r['float_act_matmuls']} | "
                     f"{r['fp_cosine_mean']:.4f} / {r['fp_cosine_min']:.4f} | {r['error_over_spread']:.3f} | "
                     f"{r['export_s']} | {r['file_mb']} |")
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated labels (" + ", ".join([*TIMM, *HF]) + ")")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "families")
    parser.add_argument("--reuse", action="store_true", help="keep the rows of models already measured")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    labels = args.only.split(",") if args.only else [*TIMM, *HF]
    rows = []
    for label in labels:
        model = TIMM[label][0] if label in TIMM else f"hf:{hf_folder(args.work / 'hf', label)}"
        rows += run_model(label, model, args.work, args.reuse)
    info = machine_info(1)
    families = "\n".join(f"- {k}: `{m}` ({fam}{', ' + n if n else ', random weights'})" for k, (m, fam, n) in TIMM.items())
    text = (f"# Every family at W8/A8 and W4/A4 (repq), both formats\n\n`python benchmarks/families.py -o "
            f"{args.output}` on {info['cpu']} ({', '.join(info['cpu_flags'])}), onnxruntime {info['onnxruntime']}, "
            f"{info['date']}.\n\n{families}\n- Hugging Face: {', '.join(HF)} (random configs at DeiT-Ti's size, "
            f"`--model hf:DIR`)\n\n{table(rows)}\n\nValidated: the export's own check of onnxruntime against the "
            "PyTorch simulation on 8 calibration-folder images (top-1 agreement, largest logit difference, share "
            "of images bit-exact; headless models compare features). Cosine and error/spread: against the FP "
            f"model on {COSINE_IMAGES} calibration images (error / spread = ||q - fp|| / ||fp - mean(fp)||).\n")
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
