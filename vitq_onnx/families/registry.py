"""The family registry: the ``Family`` base, ``register_family`` and what the CLI lists."""

from __future__ import annotations

from typing import Callable

FAMILIES: dict[str, "Family"] = {}


class Family:
    """Base of every family; subclasses register one instance each with ``register_family``."""

    name = ""
    description = ""  # the architectures it covers, as ``--help`` and errors list them
    short_names: dict[str, str] = {}  # --model short name -> timm name
    # the float pieces of its attention and blocks a recipe lists (besides calibrate.FLOAT_OPS)
    float_ops: tuple[str, ...] = ()

    def attention_forward(self, module) -> Callable | None:
        """The quant-point forward for ``module`` when it is an attention of this family, else None.

        The forward computes the attention as timm's non-fused path does and calls
        ``self.vq_attend(q_scaled, k, v[, adjust, align, mix])`` for softmax(q @ k^T [adjusted]) @ v
        (``mix``: a map of the probabilities before attn @ v, e.g. talking heads; its forward then
        carries ``av_role = "attn"``, so attn @ v's first input is quantized as any activation)."""
        return None

    def adapt_checkpoint(self, state: dict, model) -> list[str]:
        """Make the entries of a checkpoint ``state`` saved for another input size fit ``model`` of
        this family, as timm does when it loads a checkpoint at another size (in place); one line
        for each change, [] when there is none to make."""
        return []

    def prepare(self, module) -> None:
        """Rewrite ``module`` in place into a form with the same float outputs whose weights the
        quant points see (e.g. a bias passed to ``F.linear`` beside the Linear moved into it)."""

    def block_rows(self, block) -> Callable | None:
        """For an instrumented block of this family, ``f(x, rows)``: the block's output on input
        ``x`` at token ``rows`` only, computed only there (the attention's queries and what follows
        them; its keys and values on every token): reconstruction at high resolution trains on a
        sample of each image's rows at a fraction of the cost. None where the family has none."""
        return None

    def norm_linear_pairs(self, module) -> list[tuple[str, str]]:
        """(LayerNorm attribute, Linear path) pairs of ``module`` when it is a block of this family
        whose Linear reads only that norm (RepQ-ViT's channel-wise fold), else []. A norm read by
        several Linears (and nothing else) names them all in a tuple of paths, the one that reads
        every token first (its input's ranges are the ones fitted)."""
        return []


def register_family(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.name] = cls()
    return cls


def adapt_checkpoint(state: dict, model) -> list[str]:
    """Every family's adaptation of ``state`` to ``model`` (``Family.adapt_checkpoint``)."""
    return [note for family in FAMILIES.values() for note in family.adapt_checkpoint(state, model)]


def prepare(model) -> None:
    """Every family's ``Family.prepare`` on every module of ``model``."""
    for module in list(model.modules()):
        for family in FAMILIES.values():
            family.prepare(module)


def block_rows(block) -> Callable | None:
    """The first family's ``Family.block_rows`` for ``block``, or None."""
    return next((f for f in (family.block_rows(block) for family in FAMILIES.values()) if f is not None), None)


def short_names() -> dict[str, str]:
    """Every family's --model short names."""
    return {short: full for family in FAMILIES.values() for short, full in family.short_names.items()}


def supported() -> str:
    """The families, as an error or ``--help`` lists them."""
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES.values())

