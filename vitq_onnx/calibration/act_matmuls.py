"""Activation-by-activation matmuls that no family instruments, found before any calibration.

A family quantizes the inputs of the attention matmuls it knows (``QuantMatMul``); any other
product of two activations (an attention of another name, talking heads, attention pooling) would
stay float32 in a model the user asked to quantize. One forward of one image finds them: the
image requires grad and the parameters do not, so a tensor that requires grad depends on the
input, and a matmul (``@``, ``matmul``, ``bmm``, ``einsum``, ``scaled_dot_product_attention``)
of two such tensors multiplies activations. Each is reported by the innermost module running it.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# set while a QuantMatMul multiplies its quantized inputs: those products are the instrumented ones
INSTRUMENTED = contextvars.ContextVar("vitq_instrumented_matmul", default=False)
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
            torch.Tensor.bmm, torch.mm, torch.Tensor.mm, torch.einsum, F.scaled_dot_product_attention}
_ADDED = {torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm}  # (input, a, b): a @ b added


class _Watch(TorchFunctionMode):
    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack, self.found = stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _MATMULS or func in _ADDED) and not INSTRUMENTED.get():
            operands = args[1:] if func is torch.einsum or func in _ADDED else args
            if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
                operands = args[1]
            tensors = [t for t in operands if isinstance(t, torch.Tensor)]
            factors = tensors[:3] if func is F.scaled_dot_product_attention else tensors[:2]  # (q, k, v)
            if sum(t.requires_grad for t in factors) >= 2:
                self.found.setdefault(self.stack[-1], getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def unquantized_matmuls(model: nn.Module, image: torch.Tensor) -> dict[str, str]:
    """{module path: its class name} of every module that multiplies two activations outside the
    families' quant points, on one forward of ``image`` (a [1, 3, H, W] batch)."""
    names = {id(m): n for n, m in model.named_modules()}
    classes = {n: type(m).__name__ for n, m in model.named_modules()}
    stack = [""]

    def leave(_mod, _args, _out) -> None:  # (a forward hook that returned a value would replace the output)
        stack.pop()

    hooks = [m.register_forward_pre_hook(lambda mod, _: stack.append(names[id(mod)])) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    watch = _Watch(stack)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), watch:
            model(image.detach().clone().requires_grad_(True))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for h in hooks:
            h.remove()
    return {path: classes.get(path, type(model).__name__) for path in watch.found}


@contextlib.contextmanager
def instrumented():
    """Marks the matmul of a QuantMatMul (quant_points.py) as one the families instrument."""
    token = INSTRUMENTED.set(True)
    try:
        yield
    finally:
        INSTRUMENTED.reset(token)
