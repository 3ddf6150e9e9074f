"""What a model file is made for: its format (``--format``) and the CPUs it is exact on (``--target-cpu``).

``ort``: 8-bit containers for onnxruntime's integer kernels (``passes/lower_integer.py``); ``qdq``:
standard QDQ with packed int4 (``passes/factor_scales.py``). ``portable``: exact on any x86-64 or
Arm CPU; ``vnni``: full-range s8 operands, exact only where products accumulate in int32 (``cpu.py``).
Torch- and onnx-free, so the command line lists them without loading either.
"""

FORMATS = ("ort", "qdq")
TARGETS = ("portable", "vnni")
