"""Activation quantizer kinds as the recipe knows them: a name, parameters and their checks.

A kind's behaviour lives in two registries keyed by the same name: calibration's
(``calibration/quantizers``: fitting, fake-quant, the exact simulation) and the passes'
(``passes/deploy.py``: the graph rewrite that deploys it). This one, torch-free, is what the
recipe validates against, and its order (registration) is the order the passes deploy in.
"""

from __future__ import annotations

import numpy as np

from ..errors import VitqError

SPECS: dict[str, "KindSpec"] = {}


class KindSpec:
    """A kind's recipe entry: ``params``, each a scalar per tensor, and what makes them valid."""

    name = ""
    params: tuple[str, ...] = ()
    deployable = True  # False: simulation only (no graph rewrite can deploy it)
    why_not_deployable = ""

    def check(self, key: str, bits: int, params: dict[str, np.ndarray]) -> None:
        """A recipe entry is valid: exactly this kind's parameters, finite scalars, bits in range."""
        if sorted(params) != sorted(self.params):
            raise VitqError(f"{key}: a {self.name} quantizer has parameters {list(self.params)}, "
                            f"recipe gives {sorted(params)}")
        if not 2 <= bits <= 8:
            raise VitqError(f"{key}: {bits} bits, expected 2..8")
        bad = [k for k, v in params.items() if np.asarray(v).size != 1 or not np.isfinite(v).all()]
        if bad:
            raise VitqError(f"{key}: parameter '{bad[0]}' is not one finite number")


def register_spec(cls: type[KindSpec]) -> type[KindSpec]:
    """Class decorator: one instance per kind."""
    SPECS[cls.name] = cls()
    return cls


def get_spec(name: str) -> KindSpec:
    if name not in SPECS:
        raise VitqError(f"unknown quantizer kind '{name}': known are {', '.join(SPECS)}")
    return SPECS[name]


def scalar(value) -> float:
    return float(np.asarray(value).reshape(()))
