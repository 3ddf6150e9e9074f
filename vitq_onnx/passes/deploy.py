"""Which graph rewrite deploys which activation quantizer kind: kind name -> pass class.

As onnxruntime's quantization registry maps an op type to the class that quantizes it, each
rewrite registers itself with ``@deploys(kind)``; ``deploy_passes`` builds, in the kinds'
registration order (``codes/spec.py``), one pass per kind the recipe uses. Nothing else on the
pass side dispatches on a kind's name.
"""

from __future__ import annotations

from ..codes.spec import SPECS, get_spec
from ..errors import VitqError

DEPLOYERS: dict[str, type] = {}


def deploys(kind: str):
    """Class decorator: this pass deploys quantizers of ``kind``; it is built with their keys."""

    def register(cls):
        get_spec(kind)  # a kind the recipe can name
        DEPLOYERS[kind] = cls
        return cls

    return register


def deploy_passes(activations: dict) -> list:
    """One pass per quantizer kind ``activations`` (recipe key -> ActQuant) uses, each with its keys."""
    passes = []
    for name, spec in SPECS.items():
        keys = [k for k, q in activations.items() if q.kind == name]
        if not keys:
            continue
        if not spec.deployable:
            raise VitqError(spec.why_not_deployable)
        if name not in DEPLOYERS:
            raise VitqError(f"no graph rewrite deploys quantizer kind '{name}'")
        passes.append(DEPLOYERS[name](keys))
    return passes
