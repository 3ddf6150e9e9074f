"""vitq-onnx: low-bit integer ONNX models from timm Vision Transformers."""

__version__ = "0.1.0"
