"""Greedy mixed precision (MPTQ-ViT): which layers can go narrower for the least change in the output.

A layer's weight and its inputs are two knobs with widths of their own: the two budgets (weight
bits per parameter, activation bits per element) are separate, and a layer often tolerates narrow
weights but not narrow inputs or the reverse; tying the two made the greedy pay for one with the
other. Sensitivity: on calibration images, the KL divergence of the model's predictions from the
FP model's when one knob alone (a Linear's or Conv's weight; a Linear's input; an attention's four
matmul inputs) drops from the widest width to each narrower one, every other tensor quantized at
the widest width as the ``repq`` recipe there has it (weights refit per output channel, inputs
refit per tensor on what reaches them). Greedy: from all at the widest width, lower the knob whose
next width costs the least KL per saved bit, until the parameter-weighted average weight width and
the element-weighted average activation width are both within the budget. The result is a
``--layer-bits`` map; the method then calibrates with it like any other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import VitqError
from ..progress import Progress
from ..recipe import Recipe
from .simulation import folded, quantized_weight, simulate
from .simulation import kl_per_image, torch_logits
from .bits import STEM_BITS, WIDTHS, BitWidths, module_of
from .calibrate import calibrate
from .methods import Method, get_method
from .state import CalibOptions
from .quantizers import fake, get_kind, kind_for
from .quantizers.weights import fake_weight, fit_weight
from .reconstruct import transformer_blocks



@dataclass
class Layer:
    """One knob of the map: a module's weight (``weight`` set) or its inputs (``inputs`` set)."""
    module: str  # the module a --layer-bits rule names
    weight: str | None  # the weight's recipe key
    inputs: list[str]  # the activations' recipe keys (the image input of the stem stays 8-bit)
    params: int = 0
    elements: int = 0  # activation elements per image
    kl: dict[int, float] = field(default_factory=dict)  # width -> KL to FP32 with this knob alone there
    floor: int = 0  # the narrowest width the greedy may give it

    @property
    def name(self) -> str:
        return f"{self.module}:{'w' if self.weight else 'a'}"


def layers_of(recipe: Recipe, inst, elements: dict[str, int]) -> list[Layer]:
    """The recipe's tensors as knobs (each module's weight, then its inputs), in the recipe's order."""
    weights: dict[str, Layer] = {}
    inputs: dict[str, Layer] = {}
    for key in list(recipe.activations) + list(recipe.weights):
        name = module_of(key)
        if key in recipe.weights:
            weights[name] = Layer(name, key, [], params=inst.weights[key].weight.numel())
        elif inst.points[key].role != "conv_input":  # the image input stays 8-bit
            layer = inputs.setdefault(name, Layer(name, None, []))
            layer.inputs.append(key)
            layer.elements += elements[key]
    modules = dict.fromkeys(module_of(k) for k in list(recipe.activations) + list(recipe.weights))
    return [k for m in modules for k in (weights.get(m), inputs.get(m)) if k is not None]


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float(kl_per_image(logits, reference).mean())


@torch.no_grad()
def measure(model: torch.nn.Module, recipe: Recipe, images: torch.Tensor, softmax_kind, widths=WIDTHS,
            progress: bool = True) -> list[Layer]:
    """Every layer's KL at each narrower width (module docstring); ``recipe`` is the widest one's."""
    reference = model(images)
    qmodel, inst = folded(model, recipe)
    fp_weights = {k: m.weight.detach().clone() for k, m in inst.weights.items()}
    for key, mod in inst.weights.items():
        mod.weight.copy_(quantized_weight(fp_weights[key], recipe.weights[key]))
    elements: dict[str, int] = {}

    def widest(point, x):
        elements.setdefault(point.key, x.numel() // len(images))
        return fake(recipe.activations[point.key], x)

    inst.set_action(widest)
    blocks = transformer_blocks(qmodel)
    outputs: dict[str, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)) for n, b in blocks]
    base = _kl(reference, qmodel(images))
    for h in handles:
        h.remove()
    layers = layers_of(recipe, inst, elements)
    order = list(elements)  # the quantizers in forward order
    bar = Progress(len(layers) * (len(widths) - 1), "mixed precision: sensitivities", progress, unit="run")
    for layer in layers:
        layer.kl[widths[0]] = base
        replay = blocks[:_first_changed(layer.module, blocks, order)]
        with _replayed(replay, outputs):
            _narrowed_kls(layer, inst, fp_weights, qmodel, images, reference, softmax_kind, widths, widest, bar)
        if layer.weight is not None:
            inst.weights[layer.weight].weight.copy_(quantized_weight(fp_weights[layer.weight],
                                                                     recipe.weights[layer.weight]))
    bar.close()
    return layers


def _first_changed(module: str, blocks: list[tuple[str, torch.nn.Module]], order: list[str]) -> int:
    """How many transformer blocks run before ``module`` (``order``: the quantizers in forward
    order): narrowing it cannot change their outputs."""
    for i, (name, _) in enumerate(blocks):
        if module == name or module.startswith(name + "."):
            return i
    own = [i for i, k in enumerate(order) if module_of(k) == module]
    last = [i for i, k in enumerate(order) if blocks and module_of(k).startswith(blocks[-1][0] + ".")]
    return len(blocks) if own and last and min(own) > max(last) else 0  # after the blocks (the head), or before


@contextmanager
def _replayed(blocks: list[tuple[str, torch.nn.Module]], outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """The blocks return their outputs of the widest pass without computing them: what comes
    before a narrowed tensor is the same, so only the rest of the network runs (about half)."""
    own = [(block, block.__dict__.get("forward")) for _, block in blocks]  # a forward patched on the instance
    for name, block in blocks:
        block.forward = lambda *_a, out=outputs[name], **_k: out
    try:
        yield
    finally:
        for block, forward in own:
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _narrowed_kls(layer, inst, fp_weights, qmodel, images, reference, softmax_kind, widths, widest, bar) -> None:
    """``layer.kl`` at every narrower width, the rest of the model at the widest."""
    for bits in widths[1:]:
        if layer.weight is not None:
            w = fp_weights[layer.weight]
            inst.weights[layer.weight].weight.copy_(fake_weight(w, fit_weight(w, bits), bits))

        def narrow(point, x, bits=bits):
            kind = kind_for(point.role, bits, softmax_kind)
            return get_kind(kind).fake(x, get_kind(kind).fit(x, bits, point), bits)

        inst.set_action(narrow, set(layer.inputs))
        layer.kl[bits] = _kl(reference, qmodel(images))
        inst.set_action(widest, set(layer.inputs))
        bar.update(1)


def averages(layers: list[Layer], width: dict[str, int]) -> tuple[float, float]:
    """(parameter-weighted average weight width, element-weighted average activation width)."""
    params = sum(layer.params for layer in layers) or 1
    elements = sum(layer.elements for layer in layers) or 1
    return (sum(layer.params * width[layer.name] for layer in layers) / params,
            sum(layer.elements * width[layer.name] for layer in layers) / elements)


def _cheapest(layers: list[Layer], width: dict[str, int], widths, weights: bool, activations: bool) -> Layer | None:
    """The layer whose next narrower width costs the least KL per saved bit (bits of the averages
    still to lower: the weights', the activations' or both); None when none can go narrower."""
    params = sum(layer.params for layer in layers) or 1
    elements = sum(layer.elements for layer in layers) or 1
    best, best_cost = None, None
    for layer in layers:
        current = widths.index(width[layer.name])
        if current + 1 == len(widths) or widths[current + 1] < layer.floor:
            continue
        saved = (width[layer.name] - widths[current + 1]) * ((layer.params / params if weights else 0)
                                                             + (layer.elements / elements if activations else 0))
        if saved <= 0:
            continue
        cost = (layer.kl[widths[current + 1]] - layer.kl[widths[current]]) / saved
        if best_cost is None or cost < best_cost:
            best, best_cost = layer, cost
    return best


def greedy(layers: list[Layer], avg_bits: float, widths=WIDTHS) -> dict[str, int]:
    """Each layer's width: lowered by least KL per saved (budget-normalized) bit until both
    averages are at most ``avg_bits``."""
    width = {layer.name: widths[0] for layer in layers}
    while True:
        w_avg, a_avg = averages(layers, width)
        if w_avg <= avg_bits + 1e-9 and a_avg <= avg_bits + 1e-9:
            return width
        best = _cheapest(layers, width, widths, w_avg > avg_bits, a_avg > avg_bits)
        if best is None:
            narrowest = averages(layers, {k.name: max(widths[-1], k.floor) for k in layers})
            raise VitqError(f"--avg-bits {avg_bits}: the narrowest widths allowed are still above it (weights "
                            f"{narrowest[0]:.2f}, activations {narrowest[1]:.2f} bits on average)")
        width[best.name] = widths[widths.index(width[best.name]) + 1]


def greedy_path(layers: list[Layer], widths=WIDTHS) -> list[dict[str, int]]:
    """Every map the greedy passes through, from all widest to all narrowest (both averages lowered)."""
    width = {layer.name: widths[0] for layer in layers}
    path = [dict(width)]
    while (best := _cheapest(layers, width, widths, True, True)) is not None:
        width[best.name] = widths[widths.index(width[best.name]) + 1]
        path.append(dict(width))
    return path


def longest_within(path: list, drop: Callable[[int], float], max_drop: float) -> tuple[int, dict[int, float]]:
    """The furthest step of ``path`` whose ``drop`` is at most ``max_drop``, by bisection (the drop
    grows along the path, up to noise), and every drop measured on the way."""
    seen = {0: drop(0)}
    lo, hi = 0, len(path) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        seen[mid] = drop(mid)
        lo, hi = (mid, hi) if seen[mid] <= max_drop else (lo, mid - 1)
    return lo, seen


def module_widths(layers: list[Layer], width: dict[str, int], w_cap: int) -> dict[str, tuple[int, int]]:
    """Each module's (weight, activation) width; a module without a weight (an attention) keeps
    ``w_cap``, one without quantized inputs (the stem) its image input's ``STEM_BITS``."""
    out: dict[str, list[int]] = {}
    for layer in layers:
        pair = out.setdefault(layer.module, [w_cap, STEM_BITS])
        pair[0 if layer.weight else 1] = width[layer.name]
    return {m: (w, a) for m, (w, a) in out.items()}


def layer_rules(layers: list[Layer], width: dict[str, int], w_cap: int) -> list[str]:
    """``--layer-bits`` rules for the chosen widths, one per module."""
    return [f"{m}={w}/{a}" for m, (w, a) in module_widths(layers, width, w_cap).items()]


def bit_table(layers: list[Layer], width: dict[str, int]) -> str:
    """The chosen map, one line per knob: width, parameters, activation elements, KL there."""
    lines = [f"{'layer':30} {'bits':>4} {'params':>9} {'act/img':>9} {'KL at bits':>10}"]
    for layer in layers:
        lines.append(f"{layer.name:30} {width[layer.name]:>4} {layer.params:>9} {layer.elements:>9} "
                     f"{layer.kl[width[layer.name]]:>10.4f}")
    return "\n".join(lines)


SENSITIVITY_IMAGES = 16  # calibration images the per-layer sensitivities are measured on


def _sensitivities(model, images: np.ndarray, cap: BitWidths, timm_name: str, say, progress: bool, base: Method):
    widths = tuple(w for w in WIDTHS if w <= min(cap.w, cap.a))
    say(f"mixed precision: sensitivities of every layer at widths {list(widths[1:])} on "
        f"{min(SENSITIVITY_IMAGES, len(images))} images ({base.name} recipes)")
    widest = calibrate(model, images, cap, base, timm_name, CalibOptions(progress=False))
    images = torch.from_numpy(images[:SENSITIVITY_IMAGES])
    return measure(model, widest, images, base.softmax_kind, widths, progress), widths


def _chosen(layers: list[Layer], width: dict[str, int], cap: BitWidths, say, info: dict):
    """The map as bit widths to calibrate with, and what the recipe records of it."""
    w_avg, a_avg = averages(layers, width)
    say(f"mixed precision: average weight width {w_avg:.3f}, activation width {a_avg:.3f}\n" + bit_table(layers, width))
    return BitWidths.parse(f"{cap.w}/{cap.a}", layer_rules(layers, width, cap.w)), {
        **info, "weight_avg": round(w_avg, 4), "activation_avg": round(a_avg, 4), "widths": width}


# No weight below this when the method then reconstructs the quantized weights: the greedy ranks
# by KL before reconstruction, which heals 4-bit weights far better than 3-bit ones; on held-out
# calibration images (repq-recon, --avg-bits 4; docs/results.md) the map with 3-bit weights scored a KL to
# FP32 of 0.342, the one with every weight at 4 bits 0.317
RECONSTRUCTED_WEIGHT_FLOOR = 4


def choose_widths(model, images: np.ndarray, cap: BitWidths, avg_bits: float, timm_name: str, say, progress: bool,
                  method: Method):
    """Greedy mixed precision at most ``avg_bits`` on average, widest ``cap``, for ``method`` (its
    ``sensitivity`` method's recipes are measured; a method that trains the quantized weights keeps
    none below RECONSTRUCTED_WEIGHT_FLOOR): the bit widths to calibrate with, and what to record."""
    layers, widths = _sensitivities(model, images, cap, timm_name, say, progress, get_method(method.sensitivity))
    reconstructs = method.trains_quantized_weights
    if reconstructs:
        for layer in layers:
            layer.floor = RECONSTRUCTED_WEIGHT_FLOOR if layer.weight else 0
    return _chosen(layers, greedy(layers, avg_bits, widths), cap, say,
                   {"avg_bits": avg_bits, "sensitivity_images": min(SENSITIVITY_IMAGES, len(images)),
                    **({"weight_floor": RECONSTRUCTED_WEIGHT_FLOOR} if reconstructs else {})})


def label_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's logit of its label minus its largest other logit (positive: top-1 right)."""
    rows = np.arange(len(labels))
    right = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return right - others.max(1)


# the width of --max-drop's smoothing, in FP margins: 0.45 x the median |margin| of the held-out
# images (DeiT-Ti: 1.1 logits). Chosen on held-out calibration images (drop_statistic.py): of
# 0.1, 0.2, 0.45 and 0.9 medians, 0.45 followed the counted drop along the greedy path with the
# least bias (docs/methods.md)
SMOOTHING = 0.45


def image_drops(fp: np.ndarray, q: np.ndarray, labels: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Each image's share of the top-1 points the quantized logits ``q`` lose against the float
    ``fp``, counted by how sure its decision is: right with probability Phi(margin / tau), tau =
    ``smoothing`` x the median |float margin|. Counting whole images (tau -> 0) moves by 1.08
    points per flip on 93 images, so one image near the boundary decides; this moves smoothly as
    margins shrink or grow. Zero for identical logits."""
    m, mq = label_margins(fp, labels), label_margins(q, labels)
    tau = smoothing * float(np.median(np.abs(m))) or 1.0
    right = torch.special.ndtr(torch.from_numpy(np.stack([m, mq]).astype(np.float64)) / tau).numpy()
    return 100 * (right[0] - right[1])


def expected_drop(fp: np.ndarray, q: np.ndarray, labels: np.ndarray, smoothing: float = SMOOTHING) -> float:
    """The expected top-1 drop in points (``image_drops``' mean)."""
    return float(image_drops(fp, q, labels, smoothing).mean())


# --max-drop holds the expected drop plus this many of its standard errors (over the held-out
# images) within POINTS: bisection keeps the furthest map that looks good, so with the estimate
# alone the maps it keeps are those whose noise happened to flatter them
DROP_MARGIN_SE = 1.0


@torch.no_grad()
def widths_for_drop(model, images: np.ndarray, held: tuple[np.ndarray, np.ndarray], cap: BitWidths, max_drop: float,
                    timm_name: str, say, progress: bool, method: Method):
    """The narrowest map along the greedy path whose expected top-1 drop from the FP model
    (``expected_drop``) on held-out labelled calibration images (``held``: images, labels; none of
    them calibrates), plus DROP_MARGIN_SE standard errors, is at most ``max_drop`` points. Each map
    tried is calibrated with ``method``'s ``sensitivity`` method and scored in the exact
    simulation; the counted drop is recorded beside the expected one."""
    base = get_method(method.sensitivity)
    layers, widths = _sensitivities(model, images, cap, timm_name, say, progress, base)
    path = greedy_path(layers, widths)
    held_images, labels = held
    fp = torch_logits(model, held_images)
    fp_top1 = 100 * float((fp.argmax(1) == labels).mean())
    bar = Progress(int(np.ceil(np.log2(len(path)))) + 1, "mixed precision: expected held-out drop along the greedy path",
                   progress, unit="map")
    counted: dict[int, float] = {}
    error: dict[int, float] = {}  # the expected drop's standard error over the images
    expected: dict[int, float] = {}

    def drop(step: int) -> float:
        bits = BitWidths.parse(f"{cap.w}/{cap.a}", layer_rules(layers, path[step], cap.w))
        recipe = calibrate(model, images, bits, base, timm_name, CalibOptions(progress=False))
        q = torch_logits(simulate(model, recipe), held_images)
        counted[step] = fp_top1 - 100 * float((q.argmax(1) == labels).mean())
        drops = image_drops(fp, q, labels)
        error[step] = float(drops.std(ddof=1) / np.sqrt(len(drops)))
        expected[step] = float(drops.mean())
        bar.update(1, step=f"{step}/{len(path) - 1}", drop=expected[step])
        return expected[step] + DROP_MARGIN_SE * error[step]

    step, seen = longest_within(path, drop, max_drop)
    bar.close()
    say(f"mixed precision: step {step} of {len(path) - 1}: expected held-out drop {expected[step]:.2f} +- "
        f"{error[step]:.2f} points (one standard error on {len(labels)} images; counted {counted[step]:.2f})")
    if seen[step] > max_drop:
        say(f"vitq-onnx: warning: even the widest map may lose {seen[0]:.2f} points on the held-out images (expected "
            f"drop and {DROP_MARGIN_SE:g} standard error; --max-drop {max_drop}); it is kept")
    tried = []
    for k, d in sorted(seen.items()):
        w_avg, a_avg = averages(layers, path[k])
        tried.append({"step": k, "weight_avg": round(w_avg, 4), "activation_avg": round(a_avg, 4),
                      "held_out_drop": round(expected[k], 3), "held_out_drop_bound": round(d, 3),
                      "held_out_counted_drop": round(counted[k], 3)})
    return _chosen(layers, path[step], cap, say, {
        "max_drop": max_drop, "sensitivity_images": min(SENSITIVITY_IMAGES, len(images)),
        "held_out_images": int(len(labels)), "held_out_fp_top1": round(fp_top1, 3),
        "held_out_drop": round(expected[step], 3), "held_out_drop_error": round(error[step], 3),
        "held_out_drop_bound": round(seen[step], 3), "drop_margin_se": DROP_MARGIN_SE,
        "held_out_counted_drop": round(counted[step], 3),
        "drop_statistic": "expected", "path_steps": len(path) - 1, "tried": tried})
