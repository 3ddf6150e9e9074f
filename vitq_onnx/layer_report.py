"""``vitq-onnx report``: where a quantized model loses accuracy, tensor by tensor.

For every quantized tensor of an exported model (its recipe, beside the .onnx), on real images:
how far the tensor is from the FP model's at the same place (SQNR in dB and cosine similarity),
how much of that its own quantizer adds (``quant_sqnr_db``: the quantizer's output against its
input), and how far the output of the block that holds it is from the FP block's. Layers kept
float are listed as such. The FP reference is the FP model with the recipe's
reparameterizations folded in (the same function, in the domain the quantizers see); the
quantized side is the simulation with the attention matmuls in float on dequantized inputs
(within float rounding of the exact one), checked against the ONNX model's own outputs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from . import runtime
from .calibration.bits import module_of
from .calibration.quantizers import fake
from .errors import VitqError
from .images import Preprocess, calibration_subset, list_images, load_images
from .models import cached_pretrained_file, create_model
from .naming import AV, QK, tensor_label
from .progress import Progress
from .recipe import Recipe, recipe_path, split_key, tensor_key
from .calibration.simulation import folded, simulated
from .validate import compare_logits, feature_similarity

SORT_KEYS = {"sqnr": "sqnr_db", "quant_sqnr": "quant_sqnr_db", "block_sqnr": "block_sqnr_db", "depth": "depth"}
MIN_ONNX_AGREEMENT = 0.5  # below this, the FP weights are not the ones the model was exported from


@dataclass
class Error:
    """Running sums over batches for the SQNR and cosine similarity of a tensor to its reference."""

    ref2: float = 0.0
    cand2: float = 0.0
    dot: float = 0.0
    diff2: float = 0.0

    def add(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        r, c = ref.detach().double().flatten(), cand.detach().double().flatten()
        self.ref2 += float(r @ r)
        self.cand2 += float(c @ c)
        self.dot += float(r @ c)
        self.diff2 += float((r - c) @ (r - c))

    def sqnr_db(self) -> float | None:
        """10 log10(signal / error power); None when equal (an infinite ratio)."""
        if self.diff2 == 0:
            return None
        return 10 * math.log10(self.ref2 / self.diff2) if self.ref2 > 0 else -math.inf

    def cosine(self) -> float:
        norms = math.sqrt(self.ref2 * self.cand2)
        return self.dot / norms if norms > 0 else float(self.ref2 == self.cand2)


def block_of(module: str) -> str:
    """The transformer block a module belongs to (``blocks.3.mlp.fc1`` -> ``blocks.3``; Swin's
    ``layers.1.blocks.0``); a module outside the blocks (``patch_embed.proj``, ``head``) is its own."""
    parts = module.split(".")
    ends = [i for i in range(1, len(parts)) if parts[i - 1] == "blocks" and parts[i].isdigit()]
    return ".".join(parts[:ends[-1] + 1]) if ends else module


@dataclass
class Row:
    module: str
    tensor: str  # input / weight of a Linear or Conv; q / k / attn / v of an attention's matmuls
    kind: str  # the quantizer kind, "weight", or "float" (kept float)
    bits: int | None  # None: kept float
    error: Error = field(default_factory=Error)  # against the FP model's tensor
    own: Error | None = None  # the quantizer's output against its input (a weight's is ``error``)
    depth: int = 0  # first use in the forward pass

    def keep_float_name(self) -> str:
        """What ``--keep-float`` takes to leave this tensor float: its layer, or its attention matmul."""
        if self.bits is None:
            return self.module
        matmul = {"q": QK, "k": QK, "attn": AV, "v": AV}.get(self.tensor)
        return f"{self.module}.{matmul}" if matmul else self.module

    def to_dict(self, blocks: dict[str, Error]) -> dict:
        block = block_of(self.module)
        quantized = self.bits is not None
        return {"depth": self.depth, "module": self.module, "tensor": self.tensor, "kind": self.kind,
                "bits": self.bits, "keep_float": self.keep_float_name(),
                "sqnr_db": _num(self.error.sqnr_db()) if self.error.ref2 else None,
                "cosine": _num(self.error.cosine()) if self.error.ref2 else None,
                "quant_sqnr_db": _num(self.own.sqnr_db()) if quantized and self.own else None,
                "block": block, "block_sqnr_db": _num(blocks[block].sqnr_db()),
                "block_cosine": _num(blocks[block].cosine())}


def _num(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def read_model(model_path: Path) -> tuple[Recipe, dict]:
    """The recipe written beside ``model_path`` by its export, checked against the model's
    metadata; and that metadata (``vitq.*`` entries)."""
    path = recipe_path(model_path)
    if not model_path.is_file():
        raise VitqError(f"model not found: {model_path}")
    if not path.is_file():
        raise VitqError(f"no recipe beside {model_path}: expected {path} (vitq-onnx export writes it next to "
                        "the model; keep the two together)")
    recipe = Recipe.load(path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise VitqError(f"cannot read {model_path} as ONNX: {str(exc).splitlines()[0][:160]}") from None
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key.startswith("vitq.")}
    summary = meta.get(runtime.META_RECIPE)
    if summary is None or runtime.META_PREPROCESS not in meta:
        raise VitqError(f"{model_path} has no vitq-onnx metadata: report reads models vitq-onnx exported")
    if summary.get("tensor_bits") != recipe.tensor_bits() or summary.get("model") != recipe.model:
        raise VitqError(f"{path} is not the recipe of {model_path}: their models or quantized tensors differ")
    return recipe, meta


@torch.no_grad()
def layer_report(model_path: str | Path, images_dir: str | Path, num_images: int = 32, weights: Path | None = None,
                 random_weights: bool = False, batch_size: int = 8, progress: bool = True) -> dict:
    """Every quantized tensor's error on ``num_images`` images of the folder (a fixed random
    subset), rows in forward order; with the model's output error and its check against onnxruntime."""
    model_path = Path(model_path)
    recipe, meta = read_model(model_path)
    if recipe.model.startswith("hf:"):
        raise VitqError(f"report rebuilds the FP model by its timm name; {model_path.name} is a Hugging Face tower "
                        f"({recipe.model}): not supported yet")
    preprocess = Preprocess.from_dict(meta[runtime.META_PREPROCESS])
    paths = calibration_subset(list_images(images_dir), num_images, "--num-images")
    if weights is None and not random_weights and cached_pretrained_file(recipe.model) is None:
        raise VitqError(f"report compares {model_path.name} with the FP model it was exported from: pass --weights "
                        f"FILE, that checkpoint of {recipe.model} (--random-weights only for a model exported "
                        "with --random-weights)")
    model = create_model(recipe.model, weights, random_weights, **recipe.info.get("model_args", {}))
    images, _ = load_images(paths, preprocess)
    fp, fp_inst = folded(model, recipe)
    sim, sim_inst = simulated(model, recipe, exact_attention=False)
    rows = _rows(recipe, fp_inst)
    capture = _Capture(recipe, rows)
    capture.attach(fp, fp_inst, sim, sim_inst)
    sess = runtime.session(model_path)
    outputs, sim_out, onnx_out = Error(), [], []
    bar = Progress(len(images), "report", progress, unit="img")
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[i:i + batch_size])
        capture.new_batch()
        ref = fp(batch)
        out = sim(batch)
        outputs.add(ref, out)
        sim_out.append(out.numpy())
        onnx_out.append(runtime.run(sess, images[i:i + batch_size]))
        bar.update(len(batch))
    bar.close()
    for key in recipe.weights:  # never called: scored once, placed at its layer's input
        rows[key].error.add(fp_inst.weights[key].weight, sim_inst.weights[key].weight)
        rows[key].depth = rows[tensor_key(split_key(key)[0], 0)].depth
    sim_out, onnx_out = np.concatenate(sim_out), np.concatenate(onnx_out)
    headless = bool(meta.get(runtime.META_RECIPE, {}).get("headless"))
    check = (feature_similarity(onnx_out, sim_out)["cosine_mean"] if headless
             else compare_logits(onnx_out, sim_out)["top1_agreement"])
    if check < MIN_ONNX_AGREEMENT:
        raise VitqError(f"the model rebuilt from the recipe agrees with {model_path.name} on only {check:.0%} of the "
                        "images: are --weights the ones it was exported from?")
    table = sorted((r.to_dict(capture.blocks) for r in rows.values()), key=lambda r: r["depth"])
    return {"model": str(model_path), "timm_model": recipe.model, "method": recipe.method,
            "bits": recipe.info.get("bits", {"w": recipe.w_bits, "a": recipe.a_bits}), "images": int(len(images)),
            "quantized_tensors": sum(r["kind"] != "float" for r in table),
            "float_layers": sum(r["kind"] == "float" for r in table),
            "output": {"sqnr_db": _num(outputs.sqnr_db()), "cosine": _num(outputs.cosine()),
                       ("onnx_feature_cosine" if headless else "onnx_top1_agreement"): round(check, 6)},
            "tensors": table}


def _rows(recipe: Recipe, inst) -> dict[str, Row]:
    """A row per quantized tensor (by recipe key) and per layer kept float (by module name)."""
    rows = {}
    for key, q in {**recipe.activations, **recipe.weights}.items():
        node, index = split_key(key)
        row = Row(module_of(key), tensor_label(node, index).rpartition("/")[2], getattr(q, "kind", "weight"), q.bits)
        row.own = row.error if key in recipe.weights else Error()  # the FP weight is the weight's own input
        rows[key] = row
    for name in recipe.float_layers:  # an attention matmul's inputs are not scored: no "input" to show
        rows[name] = Row(name, "input" if name in inst.float_layers else "-", "float", None)
    return rows


class _Capture:
    """Hooks that record the FP model's tensors and block outputs for one batch, then score the
    quantized model's against them as it runs the same batch."""

    def __init__(self, recipe: Recipe, rows: dict[str, Row]):
        self.recipe, self.rows = recipe, rows
        self.blocks: dict[str, Error] = defaultdict(Error)
        self.fp: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.used: dict[str, int] = defaultdict(int)
        self.order = 0

    def new_batch(self) -> None:
        self.fp.clear()
        self.used.clear()

    def attach(self, fp, fp_inst, sim, sim_inst) -> None:
        fp_inst.set_action(lambda point, x: self._record(point.key, x))
        sim_inst.set_action(self._quantize)
        for name in {block_of(r.module) for r in self.rows.values()}:
            fp.get_submodule(name).register_forward_hook(lambda _m, _a, y, n=name: self._record(("block", n), y))
            sim.get_submodule(name).register_forward_hook(lambda _m, _a, y, n=name: self._score_block(n, y))
        for name, layer in fp_inst.float_layers.items():  # what arrives at a layer kept float
            layer.register_forward_pre_hook(self._record_input(name))
            sim_inst.float_layers[name].register_forward_pre_hook(self._score_input(name))
        for name in fp_inst.float_matmuls:  # (their inputs are not separable: only their place)
            fp.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(self._record_input(name, False))

    def _record_input(self, name: str, keep: bool = True):
        def hook(_module, args):
            self._record(name, args[0] if keep else None)
        return hook

    def _score_input(self, name: str):
        def hook(_module, args):
            self.rows[name].error.add(self._reference(name), args[0])
        return hook

    def _record(self, key, x: torch.Tensor | None) -> torch.Tensor | None:
        if key in self.rows and not self.rows[key].depth:
            self.order += 1
            self.rows[key].depth = self.order
        if x is not None:
            self.fp[key].append(x)
        return x

    def _reference(self, key) -> torch.Tensor:
        ref = self.fp[key][self.used[key]]  # the same call of the FP model (attention maps come in slices)
        self.used[key] += 1
        return ref

    def _quantize(self, point, x: torch.Tensor) -> torch.Tensor:
        y = fake(self.recipe.activations[point.key], x)
        row = self.rows[point.key]
        row.error.add(self._reference(point.key), y)
        row.own.add(x, y)
        return y

    def _score_block(self, name: str, y) -> None:
        if isinstance(y, torch.Tensor):
            self.blocks[name].add(self._reference(("block", name)), y)


def sorted_rows(report: dict, by: str = "sqnr") -> list[dict]:
    """Worst first (lowest dB; exact and float rows last), or in forward order for ``depth``."""
    key = SORT_KEYS[by]
    if key == "depth":
        return list(report["tensors"])
    return sorted(report["tensors"], key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0))


COLUMNS = ["module", "tensor", "kind", "bits", "sqnr_db", "cosine", "quant_sqnr_db", "block", "block_sqnr_db",
           "block_cosine", "depth", "keep_float"]


def table_text(rows: list[dict]) -> str:
    """A fixed-width table of ``rows``: one line per tensor."""
    def cell(r, c):
        v = r[c]
        if v is None:
            return "float" if c == "bits" else "-"
        return f"{v:.2f}" if c.endswith("_db") else f"{v:.4f}" if c.endswith("cosine") else str(v)

    cells = [COLUMNS] + [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) if i < 3 or i in (7, 11) else v.rjust(w) for i, (v, w) in
                               enumerate(zip(line, widths))) for line in cells)


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r[c] for c in COLUMNS} for r in rows)
    return out.getvalue()


def plot(report: dict, fmt: str = "png") -> bytes:
    """SQNR against the FP model along the depth: one line per tensor of a block (``mlp.fc1 input``,
    ``attn attn``, ...) over the block index; tensors outside the blocks as single points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VitqError("--plot needs matplotlib: pip install matplotlib") from None
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    blocks = sorted({block_of(r["module"]) for r in report["tensors"] if block_of(r["module"]) != r["module"]},
                    key=lambda b: min(r["depth"] for r in report["tensors"] if block_of(r["module"]) == b))
    index = {b: i for i, b in enumerate(blocks)}
    first = min((r["depth"] for r in report["tensors"] if block_of(r["module"]) in index), default=0)
    for r in report["tensors"]:
        if r["sqnr_db"] is None:
            continue
        block = block_of(r["module"])
        inner = r["module"][len(block) + 1:] if block in index else r["module"]
        x = index.get(block, -1 if r["depth"] < first else len(blocks))
        lines[f"{inner} {r['tensor']}"].append((x, r["sqnr_db"]))
    fig, ax = plt.subplots(figsize=(11, 6))
    colors = plt.get_cmap("tab20").colors
    for i, (label, points) in enumerate(sorted(lines.items())):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, label=label, color=colors[i % len(colors)],
                linestyle="--" if label.endswith(" weight") else "-")
    ax.set_xlabel("block (-1: before the blocks, last: after them)")
    ax.set_ylabel("SQNR against the FP model (dB)")
    ax.set_title(f"{report['timm_model']} W{report['bits']['w']}/A{report['bits']['a']} ({report['method']}), "
                 f"{report['images']} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format=fmt)
    plt.close(fig)
    return out.getvalue()
