"""Torch-free arithmetic that calibration (PyTorch) and the graph passes (ONNX) must share bit for bit.

Each activation quantizer kind declares its recipe parameters and their checks here
(``spec.py``); the kinds whose codes stand for non-affine levels keep the constants and tables
both sides compute with (``log2.py``, ``sulq.py``, ``log2_table.py``), and weights and float
parameter storage their rounding (``weights.py``, ``storage.py``). Nothing here imports torch,
``calibration/`` or ``passes/``: both import this.
"""

from . import uniform, log2, sulq, log2_table  # noqa: F401  (registers the kinds' specs, in this order)
