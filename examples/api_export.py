"""Export from Python: a timm model in memory, calibration images as a tensor, the ONNX model back.

    python examples/api_export.py --weights ../shared/models/deit_tiny_patch16_224.safetensors \
        --calib ../shared/data/imagenet-sample/calib --bits 4/4 -o runs/api_deit_t_w4a4.onnx

The same as ``vitq-onnx export``, but the script owns the model and the images: here it loads
DeiT-Ti itself, preprocesses a few images with the model's own eval transform, and runs the
returned model in onnxruntime at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
from safetensors.torch import load_file

import vitq_onnx
from vitq_onnx.images import Preprocess, list_images, load_images
from vitq_onnx.images import calibration_subset


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name")
    p.add_argument("--weights", type=Path, help=".safetensors weights (default: random, for a try)")
    p.add_argument("--calib", type=Path, required=True, help="folder of images")
    p.add_argument("--bits", default="4/4")
    p.add_argument("--method", default="auto", help="calibration method (auto: by the bits, docs/methods.md)")
    p.add_argument("-o", "--output", type=Path, help="also write the model and its recipe here")
    args = p.parse_args(argv)

    model = timm.create_model(args.model, pretrained=False).eval()
    if args.weights is not None:
        model.load_state_dict(load_file(str(args.weights)))
    preprocess = Preprocess.from_model(model)
    images = load_images(calibration_subset(list_images(args.calib), 32), preprocess)[0]  # float32 [N, 3, H, W]

    result = vitq_onnx.export(model, args.bits, images, method=args.method, output=args.output)
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: images[:4]})[0]
    print(f"W/A {args.bits}: onnxruntime agrees with the simulation on {result.report['exact_images']:.0%} of "
          f"{result.report['images']} images bit for bit; classes of the first 4: {np.argmax(logits, 1).tolist()}")
    return result.report


if __name__ == "__main__":
    main()
