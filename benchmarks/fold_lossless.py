"""Is the RepQ-ViT fold lossless? FP32 graph before vs after ``fold_reparam`` on every val image.

    python benchmarks/fold_lossless.py --recipe runs/accuracy/deit_t_w4a4_repq.recipe.json \
        -o benchmarks/results/fold_lossless.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vitq_onnx import runtime
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.images import Preprocess, list_images, load_images
from vitq_onnx.models import create_model
from vitq_onnx.passes import PassContext, run_passes
from vitq_onnx.passes.fold_reparam import FoldReparam
from vitq_onnx.passes.name_nodes import NameNodes
from vitq_onnx.recipe import Recipe

SHARED = Path(os.environ.get("VITQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    recipe = Recipe.load(args.recipe)
    model = create_model("deit_t", SHARED / "models" / "deit_tiny_patch16_224.safetensors")
    pre = Preprocess.from_model(model)
    images, _ = load_images(list_images(SHARED / "data" / "imagenet-sample" / "val"), pre)
    fp32 = export_fp32(model, pre.size)
    folded = run_passes(fp32, [NameNodes(), FoldReparam()], PassContext(recipe), progress=False)
    before = runtime.run(runtime.session(fp32), images)
    after = runtime.run(runtime.session(folded), images)
    diff = np.abs(before - after)
    result = {"recipe": str(args.recipe), "images": len(images), "folded_norms": len(recipe.reparams),
              "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
              "top1_agreement": float((before.argmax(1) == after.argmax(1)).mean())}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.output.write_text(
        "| recipe | val images | LayerNorms folded | max \\|Δlogit\\| | mean \\|Δlogit\\| | top-1 agreement |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.recipe.name} | {len(images)} | {len(recipe.reparams)} | {diff.max():.2e} | {diff.mean():.2e} "
        f"| {100 * result['top1_agreement']:.2f} |\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
