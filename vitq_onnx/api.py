"""Python API: ``vitq_onnx.export(...)``, the CLI's export for scripts and notebooks.

It takes what a script holds: a timm model name or an ``nn.Module`` already in memory, and the
calibration data as a folder, a preprocessed tensor/array [N, 3, H, W], or an iterable of
images or batches. Every other keyword is an export option (``options.OPTIONS``: the same as
the CLI's flags, underscores for dashes). It returns the quantized ONNX model, its recipe and the
validation report, and writes files only when given ``output`` (as the CLI writes them: all or
nothing). Errors raise ``VitqError``, worded with these keywords.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch

from . import orchestrator
from .errors import VitqError
from .options import BY_NAME, OPTIONS, ExportOptions, api_wording, check_options, resolved
from .recipe import Recipe

_POSITIONAL = ("model", "bits", "calib")  # export(model, bits, calib, *, output=None, **options)


@dataclass
class Exported:
    model: onnx.ModelProto  # the quantized model, metadata included
    recipe: Recipe
    report: dict  # validation: bit-exactness against the simulation, agreement with the FP model


def export(model: str | torch.nn.Module, bits: str | None = None,
           calib: str | Path | np.ndarray | torch.Tensor | Iterable = None, *, output: str | Path | None = None,
           **options: Any) -> Exported:
    """Calibrate and export ``model`` at ``bits`` ("W/A", default 8/8), as ``vitq-onnx export`` does.

    ``calib``: a folder (a fixed random subset of ``num_calib`` images calibrates, another of
    ``validate_images`` validates, as in the CLI), or preprocessed images (the model's eval
    transform: ``Preprocess.from_model(model)``), of which the first ``num_calib`` calibrate and
    the first ``validate_images`` validate. ``options``: any export option by keyword (the
    signature lists them all with their defaults).
    """
    try:
        return _export(model, bits, calib, output, options)
    except VitqError as exc:
        raise VitqError(api_wording(str(exc))) from None


def _export(model, bits, calib, output, options: dict) -> Exported:
    unknown = sorted(set(options) - set(BY_NAME))
    if unknown:
        raise VitqError(f"unknown keyword '{unknown[0]}': export takes {', '.join(o.name for o in OPTIONS)}")
    if calib is None:
        raise VitqError("calib: give a folder of images, a tensor [N, 3, H, W] or an iterable of images")
    folder = calib if isinstance(calib, (str, Path)) else None
    values = {o.name: o.keyword_default for o in OPTIONS}
    values.update({k: tuple(v) if BY_NAME[k].repeat else v for k, v in options.items()})
    values.update(model=model if isinstance(model, str) else "", bits=bits,
                  calib=None if folder is None else Path(folder), output=None if output is None else Path(output))
    for name in ("weights", "recipe", "save_passes"):
        values[name] = None if values[name] is None else Path(values[name])
    opts = ExportOptions(**values)
    check_options(opts)
    opts = resolved(opts)
    qmodel, recipe, report = orchestrator.quantize(opts, None if isinstance(model, str) else model,
                                                   None if folder is not None else _arrays(calib))
    if output is not None:
        orchestrator.write(qmodel, recipe, opts.output)
    return Exported(qmodel, recipe, report)


def _arrays(calib) -> np.ndarray:
    """Preprocessed images as one float32 array [N, 3, H, W]."""
    parts = [calib] if isinstance(calib, (np.ndarray, torch.Tensor)) else list(calib)
    arrays = [np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float32) for p in parts]
    arrays = [a[None] if a.ndim == 3 else a for a in arrays]
    if not arrays or any(a.ndim != 4 or a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        raise VitqError(f"calib images must be preprocessed arrays [3, H, W] or batches [N, 3, H, W] of one "
                        f"size, got {sorted({a.shape for a in arrays})[:2]}")
    return np.concatenate(arrays)


def _signature() -> inspect.Signature:
    """export's signature with every option as a keyword and its default (for help() and IDEs)."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None if name != "model"
                                else inspect.Parameter.empty) for name in _POSITIONAL]
    params.append(inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                 default=o.keyword_default)
               for o in OPTIONS if o.name not in _POSITIONAL + ("output",)]
    return inspect.Signature(params, return_annotation=Exported)


export.__signature__ = _signature()
export.__doc__ += "\n    Options:\n" + "\n".join(f"        {o.name}: {o.help_text()}" for o in OPTIONS
                                                 if o.name not in _POSITIONAL + ("output",))
