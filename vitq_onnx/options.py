"""Every export option, declared once: the CLI's flags, the options object and the Python API's
keywords are all made from ``OPTIONS``.

An ``Option`` holds its keyword, type, default, help, and its own check; ``check_options`` adds
the checks between options. Errors are written with CLI flags (``--avg-bits``); the Python API
rewords them with its keywords (``api_wording``). Nothing here imports torch: the registries the
choices come from (methods, formats, families) are torch-free to list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import VitqError
from .lazy import lazy_import


@dataclass(frozen=True)
class Option:
    name: str  # the keyword, and the options object's field
    help: str | Callable[[], str]  # what it does (or a registry's listing); "(default ...)" is added
    type: Callable = str  # parses a CLI string
    default: Any = None
    flags: tuple[str, ...] = ()  # CLI flags; () means --<name with dashes>
    metavar: str | None = None
    choices: Callable[[], Sequence[str]] | None = None  # read from the registry that defines them
    repeat: bool = False  # a repeatable flag, collected in a tuple
    switch: bool = False  # a flag without a value (True when given)
    required: bool = False  # the CLI refuses to run without it
    check: Callable[[Any], str | None] | None = None  # the value's own error ("{flag} must ..."), or None
    api_default: Any = field(default=None, compare=False)  # the API's default where it differs (progress)
    shown_default: str | None = None  # the default as help shows it, when None stands for it

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        return self.cli_flags[0]

    @property
    def keyword_default(self) -> Any:
        """The Python API's default."""
        return self.api_default if self.api_default is not None else self.default

    @property
    def shown(self) -> str | None:
        """The default as help and README show it; None where there is none to show."""
        if self.shown_default is not None:
            return self.shown_default
        return None if self.switch or self.default is None or self.default == () else str(self.default)

    def help_text(self) -> str:
        text = self.help() if callable(self.help) else self.help
        return text + (f" (default {self.shown})" if self.shown is not None else "")


def _positive(what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v > 0 else f"{{flag}} must be a positive {what}"


def _at_least_one(v) -> str | None:
    return None if v is None or v >= 1 else "{flag} must be at least 1"


# the registries the choices come from, imported when a choice is first asked for
_methods = lazy_import("vitq_onnx.calibration.methods")
_formats = lazy_import("vitq_onnx.formats")


def _method_help() -> str:
    return (f"calibration method, one of auto, {', '.join(_methods.METHODS)} (docs/methods.md):\n"
            f"- auto: the method for the narrowest width asked ({_methods.auto_table()})\n"
            + "\n".join(f"- {m.name}: {m.description} ({m.num_calib} images)" for m in _methods.METHODS.values()))


def _model_help() -> str:
    from .families import short_names, supported

    return (f"a short name ({', '.join(short_names())}), a timm model name, or hf:DIR (a Hugging Face "
            f"save_pretrained folder); supported families: {supported()}")


def _avg_bits_check(v) -> str | None:
    from .calibration.bits import WIDTHS

    return None if v is None or WIDTHS[-1] <= v <= WIDTHS[0] else \
        f"{{flag}} must be between {WIDTHS[-1]} and {WIDTHS[0]}"


OPTIONS: tuple[Option, ...] = (
    Option("model", lambda: _model_help(), required=True),
    Option("bits", "weight/activation bits W/A, each 2..8", shown_default="8/8"),
    Option("calib", "folder of calibration images", type=Path, required=True),
    Option("output", "output .onnx path (its recipe is written beside it as .recipe.json and .recipe.npz)",
           type=Path, flags=("-o", "--output"), required=True),
    Option("method", lambda: _method_help(), metavar="METHOD", choices=lambda: ["auto", *_methods.METHODS],
           shown_default="auto"),
    Option("layer_bits", "bits for the layers whose timm module name matches the glob (repeatable, last match "
           "wins), e.g. 'blocks.11.*=8/8'", repeat=True, default=(), metavar="PATTERN=W/A"),
    Option("avg_bits", "greedy mixed precision: each layer's width from {8,6,5,4,3} (at most --bits) so that the "
           "average weight and activation widths are at most B, narrowing the layers whose output changes least "
           "(the map is printed and stored)", type=float, metavar="B", check=_avg_bits_check),
    Option("max_drop", "greedy mixed precision by accuracy: the narrowest map along the same greedy path whose "
           "expected top-1 on the calibration images that do not calibrate (labelled by synset; each image weighed "
           "by how near its logit margin is to a flip), plus one standard error, is at most POINTS below the FP "
           "model's there", type=float, metavar="POINTS", check=_positive("number of top-1 points")),
    Option("keep_float", "keep the layers whose timm module name (or a parent's) matches the glob float in the "
           "graph, the simulation and the recipe (repeatable), e.g. 'blocks.11.*', head, patch_embed, "
           "blocks.3.attn.matmul_av (the attention's softmax @ v)", flags=("--keep-float", "--exclude"),
           repeat=True, default=(), metavar="PATTERN"),
    Option("weights", ".safetensors/.pth/.pt checkpoint (loaded safely)", type=Path, metavar="FILE"),
    Option("random_weights", "random weights, for graph tests", switch=True, default=False),
    Option("img_size", "build the timm model at this input resolution (a ViT checkpoint saved at another size "
           "gets its position embedding resampled, as timm does; the printout and the recipe say so)",
           type=int, metavar="PX", check=_positive("number of pixels"), shown_default="the model's own"),
    Option("num_classes", "classifier outputs; 0 exports the features (a backbone: validated by cosine "
           "similarity instead of top-1 agreement)", type=int, metavar="N",
           check=lambda v: None if v is None or v >= 0 else "{flag} must be 0 (features) or more",
           shown_default="the model's"),
    Option("num_calib", "calibration images to use", type=int, metavar="N", check=_at_least_one,
           shown_default="the method's, listed under --method"),
    Option("recipe", "deploy this .recipe.json (from an earlier export) instead of calibrating: the same "
           "calibration in another --format (the images of --calib only validate), or refined with --search",
           type=Path, metavar="FILE"),
    Option("seed", "seed of every random choice in calibration", type=int, default=0),
    Option("device", "torch device for calibration, e.g. cuda; the simulation and validation always run the CPU "
           "kernels the graph runs", default="cpu"),
    Option("time_budget", "minutes for the whole export: it plans how many calibration images, and for block "
           "reconstruction the batch, the token rows per image and the iterations that end within it (printed, "
           "recorded in the recipe); without it every image and token and the method's iterations", type=float,
           metavar="MIN",
           check=_positive("number of minutes")),
    Option("search", "end the calibration (or refine a --recipe) with a search: evol = Evol-Q's evolutionary "
           "search of the scales (at least 96 images unless --num-calib, a quarter of them held out to stop it)",
           choices=lambda: list(_methods.SEARCHES)),
    Option("search_budget", "minutes the search may take; it keeps the best found when they are spent",
           type=float, metavar="MIN", check=_positive("number of minutes"), shown_default="9.5"),
    Option("search_fitness", "what the search minimizes against the FP logits (mse: the ablation)",
           default="infonce", choices=lambda: list(_methods.FITNESSES)),
    Option("format", "ort: 8-bit containers for onnxruntime's integer kernels; qdq: portable standard QDQ, int4 "
           "packed; openvino: standard QDQ in the forms OpenVINO's CPU plugin runs (8-bit activation codes)", default="ort", choices=lambda: list(_formats.FORMATS)),
    Option("target_cpu", "portable: exact on any x86-64 or Arm CPU (8-bit weights as u8 against 8-bit inputs); "
           "vnni: full-range s8 operands, faster on CPUs with AVX-VNNI, AVX512-VNNI or AMX and refused at load "
           "on others", default="portable", choices=lambda: list(_formats.TARGETS)),
    Option("save_passes", "write the model after every pass to this folder (NN_<pass>.onnx, for Netron)",
           type=Path, metavar="DIR"),
    Option("validate_images", "images of --calib on which the model is checked against the simulation and the "
           "FP model (the simulation costs about one float forward each)", type=int, default=8, metavar="N",
           check=_at_least_one),
    Option("min_agreement", "fail if onnxruntime agrees with the simulation (top-1; features: bit-exact) on "
           "fewer of the validation images than this share", type=float, default=0.9, metavar="SHARE",
           check=lambda v: None if 0 <= v <= 1 else "{flag} must be a share between 0 and 1"),
    Option("strict", "fail (instead of warning) when the quantized model agrees with the FP model on fewer than "
           "half of the validation images", switch=True, default=False),
    Option("progress", "no progress bars or stage lines on stderr (API: progress=True shows them)",
           flags=("-q", "--quiet"), switch=True, default=True, api_default=False),
)
BY_NAME = {o.name: o for o in OPTIONS}
RECIPE_FIXES = ("bits", "method", "layer_bits", "keep_float", "avg_bits", "max_drop", "time_budget")

ExportOptions = make_dataclass(
    "ExportOptions", [(o.name, Any, field(default=o.default)) for o in OPTIONS], frozen=True,
    namespace={"__doc__": "The export's options, one field per ``Option`` (None: not given)."})


def resolved(opts) -> Any:
    """``opts`` with the defaults that depend on nothing given filled in (--bits 8/8, --method auto)."""
    from dataclasses import replace

    return replace(opts, bits=opts.bits or "8/8", method=opts.method or "auto")


def check_options(opts) -> None:
    """Every option's own check, then the checks between options: one ``VitqError`` (CLI wording)."""
    for o in OPTIONS:
        value = getattr(opts, o.name)
        message = o.check(value) if o.check is not None else None
        if message:
            raise VitqError(message.format(flag=o.flag))
        if o.choices is not None and value is not None and value not in o.choices():
            raise VitqError(f"unknown {o.flag} '{value}': use one of {', '.join(o.choices())}")
    given = [BY_NAME[n].flag for n in RECIPE_FIXES if getattr(opts, n) not in (None, (), False)]
    if opts.recipe is not None and given:
        raise VitqError(f"--recipe already fixes the bits and the calibration: drop {', '.join(given)}")
    if opts.avg_bits is not None and opts.max_drop is not None:
        raise VitqError("--avg-bits and --max-drop each choose the bit map: give one")
    for name in ("avg_bits", "max_drop"):
        if getattr(opts, name) is not None and opts.layer_bits:
            raise VitqError(f"{BY_NAME[name].flag} chooses every layer's width: drop --layer-bits")
    if opts.search is None and (opts.search_budget is not None or opts.search_fitness != "infonce"):
        raise VitqError("--search-budget and --search-fitness set up a search: add --search evol")
    if opts.weights is not None and opts.random_weights:
        raise VitqError("--weights and --random-weights both choose the weights: give one")


def api_wording(message: str) -> str:
    """A CLI-worded error as the Python API says it: ``--weights FILE`` -> ``weights=FILE``,
    ``--search evol`` -> ``search=evol``, ``--random-weights`` -> ``random_weights=True``,
    ``--avg-bits`` -> ``avg_bits``."""
    for o in sorted(OPTIONS, key=lambda o: -max(len(f) for f in o.cli_flags)):
        values = [o.metavar] if o.metavar else list(o.choices()) if o.choices else []
        value = "( (" + "|".join(map(re.escape, values)) + "))?" if values else "()"
        for flag in (f for f in o.cli_flags if f.startswith("--")):
            message = re.sub(re.escape(flag) + value + r"(?![\w-])",
                             lambda m, o=o: o.name + ("=True" if o.switch else f"={m.group(2)}" if m.group(1) else ""),
                             message)
    return message


def markdown_table() -> str:
    """The options as README's table shows them (a test keeps README in step)."""
    rows = ["| CLI flag | Python keyword | default | what it does |", "|---|---|---|---|"]
    for o in OPTIONS:
        flags = ", ".join(f"`{f}`" for f in o.cli_flags)
        default = "required" if o.required else o.shown_default or ("—" if o.shown is None else f"`{o.shown}`")
        text = (o.help() if callable(o.help) else o.help).split("\n")[0].rstrip(":")
        rows.append(f"| {flags} | `{o.name}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(rows)
