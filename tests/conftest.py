"""Shared fixtures: the real DeiT-Ti weights and ImageNet images from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("VITQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEIT_WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "calib"
VAL = SHARED / "data" / "imagenet-sample" / "val"

torch.set_num_threads(max(1, os.cpu_count() or 1))


def _need_shared():
    if not DEIT_WEIGHTS.is_file() or not CALIB.is_dir():
        pytest.skip(f"real model and images not found under {SHARED}")


@pytest.fixture(scope="session")
def deit():
    _need_shared()
    from vitq_onnx.models import create_model

    return create_model("deit_t", weights=DEIT_WEIGHTS)


@pytest.fixture(scope="session")
def preprocess(deit):
    from vitq_onnx.images import Preprocess

    return Preprocess.from_model(deit)


@pytest.fixture(scope="session")
def calib_images(preprocess) -> np.ndarray:
    from vitq_onnx.images import load_images
    from vitq_onnx.pipeline import calibration_subset

    return load_images(calibration_subset(CALIB, 8), preprocess)[0]


@pytest.fixture(scope="session")
def val_images(preprocess) -> np.ndarray:
    from vitq_onnx.images import list_images, load_images

    return load_images(list_images(VAL)[::125], preprocess)[0]  # 5 images across the classes


@pytest.fixture(scope="session")
def fp32_onnx(deit, preprocess):
    from vitq_onnx.export import export_fp32

    return export_fp32(deit, preprocess.size)
