"""Model names and safe weight loading.

Short names (each family's, ``families/``) map to timm model names; any other timm name is accepted as is. Weights come from a
file the user passes (safetensors, or a torch checkpoint loaded with ``weights_only=True`` so no
pickled code runs), from timm's local caches (looked up on disk, never over the network), or
are random for graph tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from .errors import VitqError
from . import hf_models
from .families import adapt_checkpoint, prepare, short_names

SHORT_NAMES = short_names()


def resolve_name(name: str) -> str:
    """Short name or timm name -> timm name (``hf:DIR`` -> the name a recipe records for it); unknown
    names fail with the list of short names."""
    if hf_models.is_hf(name):
        return hf_models.model_name(name)
    timm_name = SHORT_NAMES.get(name, name)
    if not timm.is_model(timm_name):
        raise VitqError(
            f"unknown model '{name}': use one of {', '.join(SHORT_NAMES)}, a timm model name, or hf:DIR "
            "(a Hugging Face model folder)"
        )
    return timm_name


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VitqError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or unsafe files raise many different types
        what = "a safetensors file" if path.suffix == ".safetensors" else "a torch checkpoint"
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise VitqError(f"cannot read weights {path}: not {what} ({type(exc).__name__}: {detail})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitqError(f"weights file {path} holds no state dict of tensors")
    return state


def load_weights(model: torch.nn.Module, path: str | Path, model_name: str) -> list[str]:
    """Load a checkpoint strictly: every key and shape must match the architecture, once the
    model's family has made a checkpoint saved at another input size fit (``families``: a
    resampled position embedding); what it changed, one line each."""
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    if getattr(model, "num_classes", None) == 0:  # a feature extractor: the checkpoint's classifier has no place
        head = f"{model.pretrained_cfg.get('classifier', 'head')}."
        state = {k: v for k, v in state.items() if not k.startswith(head) or k in own}
    notes = adapt_checkpoint(state, model)  # each family changes only what does not fit
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") \
            or f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
        raise VitqError(
            f"weights {path} do not fit {model_name}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} mis-shaped keys ({detail})"
        )
    model.load_state_dict(state, strict=True)
    return notes


def create_model(name: str, weights: str | Path | None = None, random_weights: bool = False,
                 img_size: int | None = None, num_classes: int | None = None):
    """``build_model``'s model."""
    return build_model(name, weights, random_weights, img_size, num_classes)[0]


def build_model(name: str, weights: str | Path | None = None, random_weights: bool = False,
                img_size: int | None = None, num_classes: int | None = None) -> tuple[torch.nn.Module, list[str]]:
    """The timm model in eval mode with real weights (or random ones when asked), at ``img_size``
    when given (a checkpoint saved at another size is made to fit as timm would: its position
    embedding resampled) and with ``num_classes`` outputs (0: no classifier, the features; a
    checkpoint's head is then dropped); and what was changed to make the weights fit."""
    timm_name = resolve_name(name)
    if img_size is not None and img_size < 1:
        raise VitqError("--img-size must be a positive number of pixels")
    if num_classes is not None and num_classes < 0:
        raise VitqError("--num-classes must be 0 (features) or more")
    kwargs = build_args(img_size, num_classes)
    if hf_models.is_hf(name):
        if weights is not None or kwargs:
            raise VitqError("--weights, --img-size and --num-classes build a timm model: a Hugging Face folder "
                            "brings its own (set image_size or the labels in its config.json)")
        return prepare_model(hf_models.load(name, random_weights)), []
    try:
        model, notes = _create(timm_name, weights, random_weights, kwargs)
        prepare_model(model)
        return model, notes
    except (TypeError, AssertionError, ValueError) as exc:  # e.g. no img_size, or not a multiple of the patch
        if not kwargs:
            raise
        raise VitqError(f"{timm_name} cannot be built with {build_args_text(kwargs)}: {exc}") from None


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode, with the same float outputs in the form calibration quantizes:
    BatchNorm folded, each family's ``prepare`` applied (in place)."""
    fold_batch_norms(model.eval())
    prepare(model)
    return model


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold each BatchNorm that directly follows a Conv2d or Linear inside a Sequential (a conv stem,
    timm's ConvNorm) into it, with torch's eval-mode fusion: calibration then quantizes the weight
    the graph holds (the ONNX exporter would fold it on its own, after calibration). How many."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    # exact classes only: timm's BatchNormAct2d adds an activation, its StdConv2d re-standardizes
    fusions = {(torch.nn.Conv2d, torch.nn.BatchNorm2d): fuse_conv_bn_eval,
               (torch.nn.Linear, torch.nn.BatchNorm1d): fuse_linear_bn_eval}
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        children = list(seq.named_children())
        for (name, layer), (bn_name, bn) in zip(children, children[1:]):
            fuse = fusions.get((type(layer), type(bn)))
            if fuse is not None and bn.running_mean is not None:
                setattr(seq, name, fuse(layer, bn))
                setattr(seq, bn_name, torch.nn.Identity())
                folded += 1
    return folded


def build_args(img_size: int | None = None, num_classes: int | None = None) -> dict:
    """The timm build arguments that are set (recorded in a recipe as ``model_args``)."""
    return {k: v for k, v in (("img_size", img_size), ("num_classes", num_classes)) if v is not None}


def build_args_text(kwargs: dict | None) -> str:
    """timm build arguments as the CLI options that set them (``--img-size 224``)."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (kwargs or {}).items()) or "its defaults"


def _create(timm_name: str, weights, random_weights: bool, kwargs: dict):
    notes = []
    if weights is not None:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        notes = load_weights(model, weights, timm_name)
    elif random_weights:
        torch.manual_seed(0)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    else:
        cached = cached_pretrained_file(timm_name)
        if cached is None:
            raise VitqError(f"no pretrained weights for {timm_name} in the local Hugging Face or torch hub cache "
                            "(nothing is downloaded): pass --weights FILE (.safetensors/.pth), or "
                            "--random-weights for graph tests")
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    return model, notes


def cached_pretrained_file(timm_name: str) -> str | None:
    """The checkpoint timm would download for ``timm_name``, if a cache already holds it.

    Looked up on disk only: with no cache (no network either, usually) the export fails at once
    with what to pass, instead of retrying downloads for a minute.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.file:
        return cfg.file if Path(cfg.file).is_file() else None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for name in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None
