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

import numpy as np
import torch
import torch.nn.functional as F

from .. import runtime_kernels
from ..codes.storage import stored_values
from .quantizers import fake, get_kind, integer_matmul, torch_params
from .quantizers.weights import fake_weight, weight_values
from .quant_points import instrument
from .reparam import fold_into_torch
from ..errors import VitqError
from ..recipe import Recipe, WeightQuant, split_key, tensor_key


def _exact_linear(s_x, s_w):
    def forward(self, x):
        y = integer_matmul(x, self.weight.t(), s_x, s_w[None, :])
        return y if self.bias is None else y + self.bias

    return forward


def _exact_conv(s_x, s_w):
    def forward(self, x):
        w_step = s_w.reshape(-1, 1, 1, 1)
        acc = F.conv2d(torch.round(x / s_x).double(), torch.round(self.weight / w_step).double(), None,
                       self.stride, self.padding, self.dilation, self.groups)
        y = acc.float() * (s_x * s_w).reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    return forward


def quantized_weight(weight: torch.Tensor, q: WeightQuant) -> torch.Tensor:
    """The dequantized weight: the recipe's trained codes, or the (folded) weight rounded."""
    scale = torch.from_numpy(q.scale.astype("float32"))
    if q.codes is None:
        return fake_weight(weight, scale, q.bits)
    return weight_values(torch.from_numpy(q.codes.astype("float32")), scale)


@torch.no_grad()
def folded(model: torch.nn.Module, recipe: Recipe):
    """A copy of the FP model, instrumented as the recipe was calibrated (``keep_float``) and with
    its reparameterizations folded in: still the FP function, in the recipe's tensor domain
    (post-LayerNorm activations divided by r1). Returns (model, its ``Instrumented``)."""
    model = copy.deepcopy(model).eval()
    inst = instrument(model, recipe.keep_float)
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
    return model, inst


@torch.no_grad()
def load_quantized(inst, recipe: Recipe) -> None:
    """The recipe's dequantized weights and bias corrections into the (folded) model's layers."""
    for key, mod in inst.weights.items():
        mod.weight.copy_(quantized_weight(mod.weight, recipe.weights[key]))
    for node, delta in recipe.bias_corrections.items():
        bias = inst.weights[tensor_key(node, 1)].bias
        bias.add_(torch.from_numpy(delta).to(bias.device))


@torch.no_grad()
def simulate(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """A copy of the FP model with the recipe's reparameterizations and integer arithmetic."""
    return simulated(model, recipe)[0]


@torch.no_grad()
def simulated(model: torch.nn.Module, recipe: Recipe, exact_attention: bool = True):
    """``simulate``, and the quant points of the copy. With ``exact_attention=False`` the attention
    matmuls multiply their quant points' dequantized inputs in float (each point then sees what
    it quantizes, e.g. probabilities, not the log-probabilities the exact log2 kernel reads)."""
    model, inst = folded(model, recipe)
    for key, mod in inst.weights.items():
        q = recipe.weights[key]
        if q.scale.size != mod.weight.shape[0] or (q.codes is not None and q.codes.shape != mod.weight.shape):
            raise VitqError(f"recipe does not fit this model: {key} has another shape")
        xq = recipe.activations[tensor_key(split_key(key)[0], 0)]
        s_x = get_kind(xq.kind).step(torch_params(xq))
        exact = _exact_conv if isinstance(mod, torch.nn.Conv2d) else _exact_linear
        mod.forward = types.MethodType(exact(s_x, torch.from_numpy(q.scale.astype("float32"))), mod)
    load_quantized(inst, recipe)
    inst.set_action(lambda point, x: fake(recipe.activations[point.key], x))
    softmax_kernels = {}
    for mm in inst.matmuls if exact_attention else ():
        qa = recipe.activations[mm.a.key]
        mm.exact = get_kind(qa.kind).exact_matmul(qa, recipe.activations[mm.b.key])
        softmax_kernels[mm.node] = get_kind(qa.kind).sim_softmax
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, storage in recipe.param_storage.items():
        tensors[name].copy_(torch.from_numpy(stored_values(tensors[name].detach().cpu().numpy(), storage)))
    _runtime_float_ops(model, softmax_kernels)
    _runtime_float_layers(inst)
    return model, inst


def _runtime_float_layers(inst) -> None:
    """The layers kept float run onnxruntime's float MatMul and Conv, as the graph does: a float
    GEMM's rounding depends on its kernel, and the quantizers after it see every last bit."""
    for mod in inst.float_layers.values():
        mod.forward = runtime_kernels.FloatLayer(mod)
    for mm in inst.float_matmuls.values():
        mm.exact = runtime_kernels.matmul


class _RuntimeFunctions(torch.overrides.TorchFunctionMode):
    """Float functions whose torch and onnxruntime kernels round differently, called inside a
    model's forward, run onnxruntime's, as the exported graph does: GELU (exact or tanh: timm's and
    Hugging Face's GELU modules call ``F.gelu``), Sigmoid (also in SiLU, exported as x * Sigmoid(x),
    and CLIP's quick GELU), L2 normalization over the last axis (Swin V2's cosine attention:
    ReduceL2), means over given axes (a pooled head: ``x.mean(1)``, ``x.mean((1, 2))``: ReduceMean)
    and global average pooling (GlobalAveragePool)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return func(*args, **kwargs)
        if func in (torch.Tensor.mean, torch.mean) and kwargs.get("dtype") is None:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is not None:
                keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
                return runtime_kernels.reduce_mean(x, (dim,) if isinstance(dim, int) else tuple(dim), keep)
        if func is F.adaptive_avg_pool2d and x.dim() == 4 and \
                (args[1] if len(args) > 1 else kwargs.get("output_size")) in (1, (1, 1), [1, 1]):
            return runtime_kernels.global_average_pool(x)
        if func is F.gelu:
            return runtime_kernels.gelu(x, kwargs.get("approximate", args[1] if len(args) > 1 else "none"))
        if func is F.silu and not kwargs.get("inplace", args[1] if len(args) > 1 else False):
            return x * runtime_kernels.sigmoid(x)
        if func is F.normalize and kwargs.get("p", args[1] if len(args) > 1 else 2.0) == 2 and \
                kwargs.get("dim", args[2] if len(args) > 2 else 1) in (-1, x.dim() - 1) and kwargs.get("out") is None:
            return runtime_kernels.l2_normalize(x, kwargs.get("eps", args[3] if len(args) > 3 else 1e-12))
        if func in (torch.sigmoid, torch.Tensor.sigmoid):  # (CLIP's quick GELU: x * sigmoid(1.702 x))
            return runtime_kernels.sigmoid(x)
        return func(*args, **kwargs)


def _runtime_float_ops(model: torch.nn.Module, softmax_kernels: dict) -> None:
    """LayerNorm, GELU, SiLU's Sigmoid, (Log)Softmax, L2 normalization and a head's mean on the
    onnxruntime kernels the exported graph runs."""
    from timm.layers import LayerNorm2d

    forward = model.forward

    def with_runtime_functions(*args, **kwargs):
        with _RuntimeFunctions():
            return forward(*args, **kwargs)

    model.forward = with_runtime_functions

    for mod in model.modules():
        if isinstance(mod, LayerNorm2d):  # NCHW: channels last, normalized, back (Transpose, LN, Transpose)
            mod.forward = types.MethodType(lambda self, x: runtime_kernels.layer_norm(
                x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps).permute(0, 3, 1, 2), mod)
        elif isinstance(mod, torch.nn.LayerNorm):
            mod.forward = types.MethodType(
                lambda self, x: runtime_kernels.layer_norm(x, self.weight, self.bias, self.eps), mod)
        if hasattr(mod, "vq_softmax"):
            mod.vq_softmax = softmax_kernels.get(mod.vq_av.node, runtime_kernels.softmax)  # float: Softmax


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def kl_per_image(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference || logits) of each image's predicted class distribution (e.g. FP against quantized)."""
    return torch.nn.functional.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True,
                                      reduction="none").sum(1)
