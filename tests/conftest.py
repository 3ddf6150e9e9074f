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
    from vitq_onnx.images import list_images, load_images
    from vitq_onnx.images import calibration_subset

    return load_images(calibration_subset(list_images(CALIB), 8), preprocess)[0]


@pytest.fixture(scope="session")
def val_images(preprocess) -> np.ndarray:
    from vitq_onnx.images import list_images, load_images

    return load_images(list_images(VAL)[::125], preprocess)[0]  # 5 images across the classes


@pytest.fixture(scope="session")
def fp32_onnx(deit, preprocess):
    from vitq_onnx.fp32 import export_fp32

    return export_fp32(deit, preprocess.size)


# ---------------------------------------------------------------- fast tier: a tiny random ViT

TINY = "vitq_tiny_test"  # registered with timm below, so the CLI can build it by name


def _tiny_vit(pretrained=False, num_classes=10, img_size=32, **_timm_kwargs):
    """2 blocks, width 32, 32-px images in 8-px patches: every quant point and pass in seconds."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=num_classes)
    model.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic",
                            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "num_classes": 10}
    return model


def _register_tiny():
    import timm
    from timm.models import register_model

    if not timm.is_model(TINY):
        _tiny_vit.__name__ = TINY
        register_model(_tiny_vit)


_register_tiny()


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return _tiny_vit().eval()


@pytest.fixture(scope="session")
def tiny_images() -> np.ndarray:
    """Smooth random images (low-frequency noise), preprocessed-looking: 16 x 3 x 32 x 32."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randn(16, 3, 4, 4, generator=gen)
    fine = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (fine + 0.3 * torch.randn(16, 3, 32, 32, generator=gen)).numpy().astype(np.float32)


@pytest.fixture(scope="session")
def tiny_calib_dir(tmp_path_factory):
    """A folder of 8 small PNG images for CLI exports of the tiny model."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_calib")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((40, 40), Image.BILINEAR).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_fp32_onnx(tiny):
    from vitq_onnx.fp32 import export_fp32

    return export_fp32(tiny, 32)
