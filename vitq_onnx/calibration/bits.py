"""Bit widths per tensor: one W/A pair for the model, overridden per layer by glob rules.

``--bits 4/4`` fills the map uniformly; ``--layer-bits 'blocks.11.*=8/8'`` (repeatable, last match
wins) widens or narrows the layers whose timm module name matches; ``--keep-float 'blocks.11.*'``
keeps the matching layers out of quantization altogether. The image input to the patch
embedding stays 8-bit unless a rule names it, as in the papers. Calibration asks this map for
every tensor and the recipe stores each tensor's width, so passes and simulation follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ..errors import VitqError
from ..recipe import split_key

STEM_BITS = 8
BITS_RANGE = range(2, 9)
WIDTHS = (8, 6, 5, 4, 3)  # the widths mixed precision chooses from (--avg-bits, --max-drop)


def parse_pair(text: str) -> tuple[int, int]:
    """'W/A' -> (W, A), each in 2..8."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise VitqError(f"bad --bits '{text}': expected W/A, e.g. 8/8 or 4/4")
    w, a = int(parts[0]), int(parts[1])
    if w not in BITS_RANGE or a not in BITS_RANGE:
        raise VitqError(f"bad --bits '{text}': weight and activation bits must be 2..8")
    return w, a


def module_of(key: str) -> str:
    """'blocks.3.mlp.fc1/MatMul:0' -> 'blocks.3.mlp.fc1'; 'blocks.3.attn/matmul_qk:1' -> 'blocks.3.attn'."""
    return split_key(key)[0].rpartition("/")[0]


@dataclass(frozen=True)
class BitWidths:
    w: int
    a: int
    rules: tuple[tuple[str, int, int], ...] = field(default=())  # (module glob, W, A)
    keep_float: tuple[str, ...] = field(default=())  # module globs left float

    @classmethod
    def parse(cls, bits: str, layer_bits: list[str] | tuple[str, ...] = (),
              keep_float: list[str] | tuple[str, ...] = ()) -> "BitWidths":
        rules = []
        for rule in layer_bits:
            pattern, sep, pair = rule.rpartition("=")
            try:
                if not sep or not pattern:
                    raise VitqError(rule)
                rules.append((pattern, *parse_pair(pair)))
            except VitqError:
                raise VitqError(f"bad --layer-bits '{rule}': expected PATTERN=W/A with W and A in 2..8, "
                                "e.g. 'blocks.11.*=8/8'") from None
        if any(not p.strip() for p in keep_float):
            raise VitqError("--keep-float needs a module name or glob, e.g. 'blocks.11.*' or head")
        return cls(*parse_pair(bits), tuple(rules), tuple(keep_float))

    def _rule(self, key: str):
        module = module_of(key)
        found = [r for r in self.rules if fnmatchcase(module, r[0])]
        return found[-1] if found else None

    def weight(self, key: str) -> int:
        rule = self._rule(key)
        return rule[1] if rule else self.w

    def act(self, key: str, role: str) -> int:
        rule = self._rule(key)
        if rule:
            return rule[2]
        return STEM_BITS if role == "conv_input" else self.a

    def unmatched(self, keys) -> list[str]:
        """Rules that match none of ``keys`` (a typo in a pattern should not pass silently)."""
        modules = {module_of(k) for k in keys}
        return [r[0] for r in self.rules if not any(fnmatchcase(m, r[0]) for m in modules)]

    def to_dict(self) -> dict:
        return {"w": self.w, "a": self.a, "layers": [f"{p}={w}/{a}" for p, w, a in self.rules],
                **({"keep_float": list(self.keep_float)} if self.keep_float else {})}
