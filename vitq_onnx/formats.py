"""What a model file is made for: its format (``--format``) and the CPUs it is exact on (``--target-cpu``).

A format is a set of graph forms the passes choose between; every form computes the same codes.
``ort``: 8-bit containers for onnxruntime's integer kernels (``passes/lower_integer.py``); ``qdq``:
standard QDQ with packed int4 and integer shifts (``passes/factor_scales.py``); ``openvino``: the
standard QDQ of ``qdq`` in the forms OpenVINO's CPU plugin runs correctly (docs/runtimes.md).
``portable``: exact on any x86-64 or Arm CPU; ``vnni``: full-range s8 operands, exact only where
products accumulate in int32 (``cpu.py``). Torch- and onnx-free, so the command line lists them
without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    ort_kernels: bool  # onnxruntime's com.microsoft integer kernels; else only standard ONNX ops
    int4_weights: bool  # <= 4-bit weights in ONNX int4, two per byte (else in 8-bit containers)
    int4_activations: bool  # <= 4-bit activation codes in ONNX int4/uint4
    integer_shifts: bool  # post-Softmax powers of two by BitShift (else exact float kernels or a table)
    merged_qkv: bool  # q, k and v quantized by one per-axis QuantizeLinear above their Split


FORMAT_SPECS = {f.name: f for f in (
    Format("ort", ort_kernels=True, int4_weights=False, int4_activations=False, integer_shifts=False, merged_qkv=True),
    Format("qdq", ort_kernels=False, int4_weights=True, int4_activations=True, integer_shifts=True, merged_qkv=True),
    # OpenVINO 2026.4: refuses a per-axis activation quantizer, computes 128 >> 8 as 1 inside a
    # model, and corrupts its heap on int4 activation codes (docs/runtimes.md).
    Format("openvino", ort_kernels=False, int4_weights=True, int4_activations=False, integer_shifts=False, merged_qkv=False),
)}
FORMATS = tuple(FORMAT_SPECS)
TARGETS = ("portable", "vnni")
RUNTIMES = ("onnxruntime", "openvino")  # where ``eval`` runs a file (runtimes.py)


def format_spec(name: str) -> Format:
    return FORMAT_SPECS[name]
