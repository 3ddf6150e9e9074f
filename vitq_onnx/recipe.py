"""The recipe: the serializable seam between calibration (PyTorch) and the ONNX passes.

Every quantized tensor is addressed the way the passes see it: the canonical name of the ONNX node
that consumes it and the input index (``blocks.3.attn.qkv/MatMul:0``). A recipe is saved as JSON
(readable, diffable) with its arrays in an ``.npz`` beside it. Version 2 stores each activation
quantizer's kind-specific parameters (checked by its kind on load) and optional trained weight
codes; version 1 recipes are read and converted.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codes.spec import get_spec
from .errors import VitqError

FORMAT = "vitq-recipe"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip entry date: fixed, so the same recipe gives the same bytes
VERSION = 2


def recipe_path(model_path: Path) -> Path:
    """Where a model's recipe is: ``m.onnx`` -> ``m.recipe.json`` (its arrays in ``m.recipe.npz``)."""
    return model_path.with_name(model_path.stem + ".recipe.json")


def export_files(model_path: Path) -> list[Path]:
    """Every file an export writes: the model and its recipe (.json + .npz)."""
    return [model_path, recipe_path(model_path), recipe_path(model_path).with_suffix(".npz")]


def tensor_key(node: str, input_index: int) -> str:
    return f"{node}:{input_index}"


def split_key(key: str) -> tuple[str, int]:
    node, _, index = key.rpartition(":")
    return node, int(index)


@dataclass
class ActQuant:
    """Activation quantizer: a registered kind (``codes/spec.py``), its width and its
    kind-specific parameters (``uniform``: scale, zero_point; ``log2``: scale), scalars per tensor."""

    kind: str
    bits: int
    params: dict[str, np.ndarray]


@dataclass
class WeightQuant:
    """Symmetric per-output-channel weight quantizer: codes clamp(round(w/scale), -2^(b-1), 2^(b-1)-1).

    ``codes`` (int8, the layout of the PyTorch weight: output channels first) are set when a
    method trained the weights; the passes then use them instead of rounding the graph's weights.
    """

    bits: int
    scale: np.ndarray  # one per output channel
    codes: np.ndarray | None = None


@dataclass
class Reparam:
    """RepQ-ViT scale reparameterization of a LayerNorm and the Linear layers that read it.

    LayerNorm gamma/beta become gamma/r1 and (beta + shift)/r1; each next Linear's weight columns are
    multiplied by r1 and its bias loses W @ shift. The FP function is unchanged.
    """

    norm: str  # canonical LayerNormalization node name
    linears: list[str]  # canonical MatMul node names reading the norm's output
    r1: np.ndarray
    shift: np.ndarray


@dataclass
class Recipe:
    model: str
    method: str
    w_bits: int
    a_bits: int
    activations: dict[str, ActQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    reparams: list[Reparam] = field(default_factory=list)
    bias_corrections: dict[str, np.ndarray] = field(default_factory=dict)  # Linear node -> added to bias
    float_ops: list[str] = field(default_factory=list)
    keep_float: list[str] = field(default_factory=list)  # module globs the user kept float (--keep-float)
    float_layers: list[str] = field(default_factory=list)  # what they matched: Linear/Conv/attention matmuls
    # non-quantized float parameters -> "float16" (biases, LayerNorm: rounded to float16 values)
    # or "int8" (embedding tables: symmetric per last-axis channel), so the file stores them in
    # half or a quarter of the bytes; see passes/param_storage.py
    param_storage: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def tensor_bits(self) -> dict[str, int]:
        """Every quantized tensor's width, activations and weights, by recipe key."""
        return {k: q.bits for k, q in sorted({**self.activations, **self.weights}.items())}

    def save(self, json_path: str | Path) -> None:
        json_path = Path(json_path)
        arrays: dict[str, np.ndarray] = {}

        def ref(name: str, arr: np.ndarray) -> str:
            arrays[name] = np.asarray(arr)
            return "@" + name

        doc = {
            "format": FORMAT, "version": VERSION, "model": self.model, "method": self.method,
            "bits": {"w": self.w_bits, "a": self.a_bits},
            "activations": {
                k: {"kind": q.kind, "bits": q.bits,
                    "params": {name: ref(f"act/{k}/{name}", v) for name, v in q.params.items()}}
                for k, q in self.activations.items()
            },
            "weights": {k: {"bits": q.bits, "granularity": "per-output-channel",
                            "scale": ref(f"w/{k}/scale", q.scale),
                            **({"codes": ref(f"w/{k}/codes", q.codes)} if q.codes is not None else {})}
                        for k, q in self.weights.items()},
            "reparams": [
                {"norm": r.norm, "linears": r.linears, "r1": ref(f"rep/{r.norm}/r1", r.r1),
                 "shift": ref(f"rep/{r.norm}/shift", r.shift)} for r in self.reparams
            ],
            "bias_corrections": {k: ref(f"bias/{k}", v) for k, v in self.bias_corrections.items()},
            "float_ops": self.float_ops,
            "keep_float": self.keep_float,
            "float_layers": self.float_layers,
            "param_storage": self.param_storage,
            "info": self.info,
        }
        _save_npz(json_path.with_suffix(".npz"), arrays)
        json_path.write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, json_path: str | Path) -> "Recipe":
        json_path = Path(json_path)
        try:
            doc = json.loads(json_path.read_text())
            arrays = dict(np.load(json_path.with_suffix(".npz")))
        except Exception as exc:
            raise VitqError(f"cannot read recipe {json_path}: {str(exc)[:200]}") from None
        if doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
            raise VitqError(f"{json_path} is not a {FORMAT} file of version 1 or {VERSION} "
                            f"(found version {doc.get('version')})")
        try:
            recipe = cls._from_doc(doc, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise VitqError(f"recipe {json_path} is malformed: {type(exc).__name__} {str(exc)[:120]}") from None
        recipe.check()
        return recipe

    @classmethod
    def _from_doc(cls, doc: dict, arrays: dict) -> "Recipe":
        def get(value: str) -> np.ndarray:
            return arrays[value[1:]]

        def act(v: dict) -> ActQuant:
            if "params" not in v:  # version 1: the kind's parameters stood beside "kind"
                v = {**v, "params": {name: v[name] for name in get_spec(v["kind"]).params}}
            return ActQuant(v["kind"], v["bits"], {name: get(ref) for name, ref in v["params"].items()})

        return cls(
            model=doc["model"], method=doc["method"], w_bits=doc["bits"]["w"], a_bits=doc["bits"]["a"],
            activations={k: act(v) for k, v in doc["activations"].items()},
            weights={k: WeightQuant(v["bits"], get(v["scale"]), get(v["codes"]) if "codes" in v else None)
                     for k, v in doc["weights"].items()},
            reparams=[Reparam(r["norm"], r["linears"], get(r["r1"]), get(r["shift"]))
                      for r in doc["reparams"]],
            bias_corrections={k: get(v) for k, v in doc["bias_corrections"].items()},
            float_ops=doc["float_ops"], keep_float=doc.get("keep_float", []),
            float_layers=doc.get("float_layers", []), param_storage=doc.get("param_storage", {}), info=doc["info"],
        )

    def check(self) -> None:
        """Every quantizer is well formed: its kind checks its parameters, weights their scales."""
        for key, q in self.activations.items():
            get_spec(q.kind).check(key, q.bits, q.params)
        for key, w in self.weights.items():
            if not 2 <= w.bits <= 8 or not (np.isfinite(w.scale).all() and (w.scale > 0).all()):
                raise VitqError(f"{key}: weight bits must be 2..8 and scales finite and positive")
            if w.codes is not None:
                lo, hi = -(2 ** (w.bits - 1)), 2 ** (w.bits - 1) - 1
                if len(w.codes) != w.scale.size or w.codes.min() < lo or w.codes.max() > hi:
                    raise VitqError(f"{key}: weight codes do not fit {w.bits} bits or their {w.scale.size} scales")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez``'s layout (one ``.npy`` per array in a zip, read by ``np.load``) without its
    timestamps."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(name + ".npy", _EPOCH), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
