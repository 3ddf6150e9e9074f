"""The PyTorch simulation of a recipe: the reference the exported ONNX model must match.

Every quantized matmul and convolution runs on the integer codes, summed exactly (float64 holds
any such sum) and scaled in the order the exported integer kernels use (float32 of the sum, times
the product of the scales, plus bias); LayerNorm, Softmax, GELU and the Log of the log2 quantizer
run on onnxruntime's own kernels (``runtime_kernels``). So the simulation and onnxruntime agree to
the last bit, which at 4 bits is what keeps their predictions the same.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

from . import runtime_kernels
from .calibration import quantizers as Q
from .calibration.calibrate import fake_act
from .calibration.quant_points import QuantMatMul, instrument
from .calibration.reparam import fold_into_torch
from .errors import VitqError
from .passes.param_storage import store_param
from .recipe import ActQuant, Recipe, split_key, tensor_key


def _ints(x: torch.Tensor, step) -> torch.Tensor:
    return torch.round(x / step).double()


def _step(q: ActQuant) -> torch.Tensor:
    return torch.from_numpy(q.scale.reshape(()).astype("float32"))


def integer_matmul(a, b, step_a, step_b) -> torch.Tensor:
    """float32(exact sum of integer products) * (step_a * step_b)."""
    return (_ints(a, step_a) @ _ints(b, step_b)).float() * (step_a * step_b)


def _exact_linear(s_x, s_w):
    def forward(self, x):
        y = integer_matmul(x, self.weight.t(), s_x, s_w[None, :])
        return y if self.bias is None else y + self.bias

    return forward


def _exact_conv(s_x, s_w):
    def forward(self, x):
        w_step = s_w.reshape(-1, 1, 1, 1)
        acc = F.conv2d(_ints(x, s_x), _ints(self.weight, w_step), None, self.stride, self.padding,
                       self.dilation, self.groups)
        y = acc.float() * (s_x * s_w).reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    return forward


def _exact_attention(mm: QuantMatMul, qa: ActQuant, qb: ActQuant):
    s_a, s_b = _step(qa), _step(qb)
    if qa.kind == "log2":
        unit = Q.log2_unit(s_a, qa.bits) * s_b
        unit_odd = unit * (Q.SQRT2 - 1)

        def log2_matmul(log_a, b):  # log_a: onnxruntime's LogSoftmax, as in the graph
            shifted, odd = Q.log2_parts(Q.log2_codes_of_log(log_a, s_a, qa.bits), qa.bits)
            kv = _ints(fake_act(qb, b), s_b)
            return (shifted.double() @ kv).float() * unit + (odd.double() @ kv).float() * unit_odd

        return log2_matmul
    return lambda a, b: integer_matmul(fake_act(qa, a), fake_act(qb, b), s_a, s_b)


@torch.no_grad()
def simulate(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """A copy of the FP model with the recipe's reparameterizations and integer arithmetic."""
    model = copy.deepcopy(model).eval()
    inst = instrument(model)
    expected = set(inst.points) | set(inst.weights)
    given = set(recipe.activations) | set(recipe.weights)
    if expected != given:
        extra, missing = sorted(given - expected), sorted(expected - given)
        raise VitqError(f"recipe does not fit this model: {len(missing)} tensors missing "
                        f"({missing[:1]}), {len(extra)} unknown ({extra[:1]})")
    norms = {node: (norm, linears) for node, norm, _, linears in inst.post_norm}
    for rep in recipe.reparams:
        if rep.norm not in norms:
            raise VitqError(f"recipe folds into {rep.norm}, which this model does not have")
        fold_into_torch(*norms[rep.norm], rep)
    for key, mod in inst.weights.items():
        q = recipe.weights[key]
        s_w = torch.from_numpy(q.scale.astype("float32"))
        mod.weight.copy_(Q.fake_weight(mod.weight, s_w, q.bits))
        s_x = _step(recipe.activations[tensor_key(split_key(key)[0], 0)])
        exact = _exact_conv if isinstance(mod, torch.nn.Conv2d) else _exact_linear
        mod.forward = types.MethodType(exact(s_x, s_w), mod)
    for node, delta in recipe.bias_corrections.items():
        inst.weights[tensor_key(node, 1)].bias.add_(torch.from_numpy(delta))
    inst.set_action(lambda point, x: fake_act(recipe.activations[point.key], x))
    for mm in inst.matmuls:
        mm.exact = _exact_attention(mm, recipe.activations[mm.a.key], recipe.activations[mm.b.key])
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, storage in recipe.param_storage.items():
        tensors[name].copy_(store_param(tensors[name], storage))
    log2_attention = {mm.node for mm in inst.matmuls if recipe.activations[mm.a.key].kind == "log2"}
    _runtime_float_ops(model, log2_attention)
    return model


def _runtime_float_ops(model: torch.nn.Module, log2_attention: set[str]) -> None:
    """LayerNorm, GELU and (Log)Softmax on the onnxruntime kernels the exported graph runs."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.forward = types.MethodType(
                lambda self, x: runtime_kernels.layer_norm(x, self.weight, self.bias, self.eps), mod)
        elif isinstance(mod, torch.nn.GELU):
            mod.forward = types.MethodType(lambda self, x: runtime_kernels.gelu(x), mod)
        if hasattr(mod, "vq_softmax"):
            log2 = mod.vq_av.node in log2_attention
            mod.vq_softmax = runtime_kernels.log_softmax if log2 else runtime_kernels.softmax
