"""Hugging Face ``transformers`` vision towers as models the export takes (``--model hf:DIR``).

DIR is a folder as ``save_pretrained`` writes it: ``config.json``, the weights (safetensors, or a
``.bin`` read with ``weights_only``) and, for the images, ``preprocessor_config.json``. The tower is
wrapped so that it takes images and returns one tensor, as a timm model does: the classifier's
logits, or (a headless tower) its pooled features. Which attention classes are instrumented is
the ``hf`` family's business (``families/hf.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .errors import VitqError

PREFIX = "hf:"
# the architectures the hf family instruments (config.json "architectures"), by transformers class
SUPPORTED = ("ViTModel", "ViTForImageClassification", "Dinov2Model", "Dinov2ForImageClassification",
             "CLIPVisionModel", "SiglipVisionModel", "SiglipForImageClassification")
# PIL resample codes of preprocessor_config.json -> images.Preprocess interpolation
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFVision(nn.Module):
    """A transformers vision model as a function of images: logits, or pooled features."""

    def __init__(self, tower: nn.Module, architecture: str, preprocess):
        super().__init__()
        self.tower = tower
        self.architecture = architecture
        self.vitq_preprocess = preprocess  # what images.Preprocess.from_model returns for it
        self.num_classes = getattr(tower.config, "num_labels", 0) if "ForImageClassification" in architecture else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=x)
        if self.num_classes:
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def is_hf(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def folder_of(name: str) -> Path:
    """The folder ``hf:DIR`` names, checked: it holds a config.json of a supported architecture."""
    folder = Path(name[len(PREFIX):]).expanduser()
    if not (folder / "config.json").is_file():
        raise VitqError(f"--model {name}: no config.json in {folder} (a folder as transformers' "
                        "save_pretrained writes it)")
    architecture = _architecture(folder)
    if architecture not in SUPPORTED:
        raise VitqError(f"--model {name}: {architecture} is not supported; supported Hugging Face "
                        f"architectures: {', '.join(SUPPORTED)}")
    return folder


def model_name(name: str) -> str:
    """The name a recipe records for ``hf:DIR`` (or a tower loaded from DIR): the folder's name
    and its architecture."""
    folder = folder_of(name)
    return f"{PREFIX}{folder.resolve().name}/{_architecture(folder)}"


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise VitqError(f"{folder / 'config.json'} is not readable JSON: {exc}") from None
    names = config.get("architectures") or []
    if not names:
        raise VitqError(f"{folder / 'config.json'} names no architecture (\"architectures\")")
    return names[0]


def load(name: str, random_weights: bool = False) -> HFVision:
    """The tower in ``hf:DIR`` with its weights (random ones when asked), in eval mode."""
    try:
        import transformers
    except ImportError:
        raise VitqError("--model hf:DIR needs transformers: pip install -e '.[hf]'") from None
    folder = folder_of(name)
    architecture = _architecture(folder)
    cls = getattr(transformers, architecture)
    if random_weights:
        torch.manual_seed(0)
        tower = cls(cls.config_class.from_pretrained(folder))
    else:
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise VitqError(f"--model {name}: no weights (*.safetensors, *.bin) in {folder}; "
                            "--random-weights for graph tests")
        tower = cls.from_pretrained(folder, use_safetensors=any(folder.glob("*.safetensors")),
                                    dtype=torch.float32)  # (a half-precision checkpoint is calibrated in float32)
    return HFVision(tower.eval(), architecture, preprocess_of(folder, tower.config))


def is_tower(module) -> bool:
    """Is ``module`` a transformers model (not yet wrapped)?"""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(module).__mro__)


def wrap(tower: nn.Module) -> HFVision:
    """A transformers model given to the Python API, wrapped; its preprocessing is read from the
    folder it was loaded from (``from_pretrained``), which must hold preprocessor_config.json."""
    architecture = type(tower).__name__
    if architecture not in SUPPORTED:
        raise VitqError(f"{architecture} is not supported; supported Hugging Face architectures: "
                        f"{', '.join(SUPPORTED)}")
    folder = Path(getattr(tower.config, "_name_or_path", "") or "")
    if not str(folder) or not (folder / "preprocessor_config.json").is_file():
        raise VitqError(f"{architecture}: its preprocessing is unknown (loaded from '{folder}', which holds no "
                        "preprocessor_config.json): load it with from_pretrained from a folder that has one")
    return HFVision(tower.float(), architecture, preprocess_of(folder, tower.config))


def preprocess_of(folder: Path, config):
    """``images.Preprocess`` from the folder's preprocessor_config.json: resize (the short side,
    then a center crop; or both sides to a square), rescale, normalize."""
    from .images import Preprocess

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise VitqError(f"no preprocessor_config.json in {folder}: it says how images are resized and "
                        "normalized for this model")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitqError(f"{path} is not readable JSON: {exc}") from None
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
    if isinstance(size, int):  # older files: a number is the short side with a crop, else the square's side
        size = {"shortest_edge": size} if cfg.get("do_center_crop") else {"height": size, "width": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    interpolation = _RESAMPLE.get(cfg.get("resample", 2))
    if interpolation is None:
        raise VitqError(f"{path}: resample {cfg.get('resample')} is not supported (nearest, bilinear, bicubic)")
    factor = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    if not math.isclose(factor, 1 / 255):
        raise VitqError(f"{path}: rescale_factor {factor} is not supported (1/255 only)")
    normalize = cfg.get("do_normalize", True)
    mean = tuple(cfg.get("image_mean", (0.5,) * 3)) if normalize else (0.0,) * 3
    std = tuple(cfg.get("image_std", (0.5,) * 3)) if normalize else (1.0,) * 3
    image_size = getattr(config, "image_size", None)
    if cfg.get("do_center_crop") and "shortest_edge" in size:
        if crop.get("height", image_size) is None:
            raise VitqError(f"{path}: a center crop without a crop_size")
        side, out = int(size["shortest_edge"]), int(crop.get("height", image_size))
        if crop.get("width", out) != out:
            raise VitqError(f"{path}: only square crops are supported, got {crop}")
        crop_pct = out / side
        while math.floor(out / crop_pct) < side:  # the short side exactly as asked, through the float ratio
            crop_pct = math.nextafter(crop_pct, 0)
        return Preprocess(out, crop_pct, interpolation, mean, std)
    if "height" in size and size.get("height") == size.get("width") and not cfg.get("do_center_crop"):
        return Preprocess(int(size["height"]), 1.0, interpolation, mean, std, resize="square")
    raise VitqError(f"{path}: unsupported resize {size} (crop {crop}): a short side with a center crop, "
                    "or a square size without one")
