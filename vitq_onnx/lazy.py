"""A module loaded on its first attribute access (``importlib.util.LazyLoader``).

The registries the command line lists (methods) name torch-heavy classes; with their modules
loaded lazily, ``vitq-onnx --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module object whose code runs when an attribute is first read."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)  # as a finished import leaves it
    loader.exec_module(module)
    return module
