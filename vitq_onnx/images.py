"""Image folders, labels and the timm eval transform, in numpy + PIL only.

The same preprocessing feeds calibration (torch) and evaluation (onnxruntime only), so the
exported model carries its preprocessing config in its metadata and needs no torch to evaluate.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import VitqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform: resize the short side to size/crop_pct, center-crop, normalize (or a
    Hugging Face processor's square resize)."""

    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "short_side"  # or "square": both sides to size, no crop (Hugging Face's ViT, SigLIP)

    @classmethod
    def from_model(cls, model) -> "Preprocess":
        if getattr(model, "vitq_preprocess", None) is not None:  # a wrapped Hugging Face tower
            return model.vitq_preprocess
        from timm.data import resolve_data_config

        built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # --img-size, if given
        cfg = resolve_data_config({} if built is None else {"input_size": (3, *built)}, model=model)
        if cfg.get("crop_mode", "center") != "center" or cfg["input_size"][1] != cfg["input_size"][2]:
            raise VitqError(f"unsupported eval transform {cfg}: only square center crops")
        return cls(cfg["input_size"][2], float(cfg["crop_pct"]), cfg["interpolation"],
                   tuple(cfg["mean"]), tuple(cfg["std"]))

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["resize"] == "short_side":  # the default is not written (files made before it read the same)
            del d["resize"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["size"]), float(d["crop_pct"]), d["interpolation"],
                   tuple(d["mean"]), tuple(d["std"]), d.get("resize", "short_side"))

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        if self.resize == "square":
            img = img.resize((self.size, self.size), _RESAMPLE[self.interpolation])
            return self._normalize(img)
        scale = math.floor(self.size / self.crop_pct)
        w, h = img.size
        nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        img = img.resize((nw, nh), _RESAMPLE[self.interpolation])
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))
        return self._normalize(img)

    def _normalize(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


def list_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted; a clear error if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise VitqError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise VitqError(f"no images (.jpg/.jpeg/.png/.bmp/.webp) in {root}")
    return paths


def load_images(paths: list[Path], preprocess: Preprocess) -> tuple[np.ndarray, list[Path]]:
    """Decode and preprocess; unreadable files are skipped with a warning, none usable is an error."""
    arrays, kept = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                arrays.append(preprocess(img))
            kept.append(path)
        except Exception as exc:
            print(f"warning: skipping unreadable image {path}: {str(exc)[:120]}", file=sys.stderr)
    if not arrays:
        raise VitqError(f"none of the {len(paths)} image files could be read")
    return np.stack(arrays), kept


def load_synsets(path: str | Path | None = None) -> dict[str, int]:
    """Synset id -> class index (line number), from a file or the bundled ImageNet-1k list."""
    if path is None:
        text = resources.files("vitq_onnx").joinpath("data/imagenet_synsets.txt").read_text()
    else:
        text = Path(path).read_text()
    return {line.split()[0]: i for i, line in enumerate(text.splitlines()) if line.strip()}


def label_of(path: Path, root: Path, synsets: dict[str, int]) -> int:
    """Class index from ``<synset>_*.JPEG`` file names or an ImageFolder ``<synset>/`` parent."""
    candidates = [path.name.split("_")[0], path.stem]
    if path.parent != root:
        candidates.append(path.parent.name)
    for c in candidates:
        if c in synsets:
            return synsets[c]
    raise VitqError(f"cannot tell the class of {path}: no known synset in its name or folder")


def calibration_subset(paths: list[Path], count: int, option: str = "--num-calib") -> list[Path]:
    """A fixed random subset (seed 0) of a folder's images (``list_images``), so classes are
    spread, not alphabetical."""
    if count < 1:
        raise VitqError(f"{option} must be at least 1")
    if count < len(paths):
        paths = sorted(random.Random(0).sample(paths, count))
    return paths
