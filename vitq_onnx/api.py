"""Python API: ``vitq_onnx.export(...)``, the CLI's export for scripts and notebooks.

It takes what a script holds: a timm model name or an ``nn.Module`` already in memory, and the
calibration data as a folder, a preprocessed tensor/array [N, 3, H, W], or an iterable of
images or batches. It returns the quantized ONNX model, its recipe and the validation report,
and writes files only when given ``output`` (as the CLI writes them: all or nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from .errors import VitqError
from .images import Preprocess, list_images, load_images
from .models import create_model, resolve_name
from .outputs import check_outputs
from .pipeline import ExportOptions, calibration_subset, check_options, output_files, quantize, write
from .recipe import Recipe


@dataclass
class Exported:
    model: onnx.ModelProto  # the quantized model, metadata included
    recipe: Recipe
    report: dict  # validation: bit-exactness against the simulation, agreement with the FP model


def export(model: str | torch.nn.Module, bits: str = "8/8", calib: str | Path | np.ndarray | torch.Tensor |
           Iterable = None, *, output: str | Path | None = None, method: str = "repq", num_calib: int | None = None,
           validate_images: int = 8, layer_bits: tuple[str, ...] = (), keep_float: tuple[str, ...] = (),
           format: str = "ort", target_cpu: str = "portable",
           weights: str | Path | None = None, random_weights: bool = False, img_size: int | None = None,
           num_classes: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = False,
           strict: bool = False, min_agreement: float = 0.9) -> Exported:
    """Calibrate and export ``model`` at ``bits`` ("W/A"), as ``vitq-onnx export`` does.

    ``calib``: a folder (a fixed random subset of ``num_calib`` images calibrates, another of
    ``validate_images`` validates, as in the CLI), or preprocessed images (the model's eval
    transform: ``Preprocess.from_model(model)``), of which the first ``num_calib`` calibrate and
    the first ``validate_images`` validate. Errors raise ``VitqError``.
    """
    opts = ExportOptions(model=model if isinstance(model, str) else "", bits=bits, output=Path(output or "."),
                         calib=Path("."), weights=None if weights is None else Path(weights),
                         random_weights=random_weights, num_calib=num_calib, method=method,
                         layer_bits=tuple(layer_bits), keep_float=tuple(keep_float), seed=seed, device=device,
                         format=format, target_cpu=target_cpu,
                         min_agreement=min_agreement, strict=strict, progress=progress,
                         validate_images=validate_images, img_size=img_size, num_classes=num_classes)
    method_ = check_options(opts)
    if calib is None:
        raise VitqError("calib: give a folder of images, a tensor [N, 3, H, W] or an iterable of images")
    if output is not None:
        folder = list_images(Path(calib)) if isinstance(calib, (str, Path)) else []
        check_outputs(output_files(opts.output), [opts.weights, *folder])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if isinstance(model, str):
        name = resolve_name(model)
        model = create_model(model, opts.weights, random_weights, img_size, num_classes)
    else:
        if img_size is not None or num_classes is not None or weights is not None:
            raise VitqError("img_size, num_classes and weights build a model by name: set them on your module instead")
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        model = model.eval()
    preprocess = Preprocess.from_model(model)
    count = method_.num_calib if num_calib is None else num_calib
    images, val_images = _calibration_data(calib, preprocess, count, validate_images)
    qmodel, recipe, report = quantize(model, name, preprocess, images, val_images, opts)
    if output is not None:
        write(qmodel, recipe, opts.output)
    return Exported(qmodel, recipe, report)


def _calibration_data(calib, preprocess: Preprocess, count: int, validate: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration images, validation images), float32 [N, 3, size, size]."""
    if count < 1 or validate < 1:
        raise VitqError("num_calib and validate_images must be at least 1")
    if isinstance(calib, (str, Path)):
        paths = list_images(Path(calib))
        return (load_images(calibration_subset(paths, count), preprocess)[0],
                load_images(calibration_subset(paths, validate, "validate_images"), preprocess)[0])
    if isinstance(calib, (np.ndarray, torch.Tensor)):
        parts = [calib]
    else:
        parts = list(calib)
    arrays = [np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float32) for p in parts]
    arrays = [a[None] if a.ndim == 3 else a for a in arrays]
    want = (3, preprocess.size, preprocess.size)
    if not arrays or any(a.ndim != 4 or a.shape[1:] != want for a in arrays):
        raise VitqError(f"calib images must be preprocessed arrays of shape [3, {preprocess.size}, "
                        f"{preprocess.size}] (or batches of them), got {[a.shape for a in arrays][:2]}")
    images = np.concatenate(arrays)
    return images[:count], images[:validate]
