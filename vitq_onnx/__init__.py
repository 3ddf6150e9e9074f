"""vitq-onnx: low-bit integer ONNX models from timm Vision Transformers.

``vitq_onnx.export(model, bits, calib, ...)`` is the Python API (``api.py``); it is imported on
first use, so that the command line starts without loading torch for ``--help``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("export", "Exported"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitq_onnx' has no attribute '{name}'")
