"""A module imported on its first attribute access.

The registries the command line lists (methods) name torch-heavy classes; with their modules
imported on first use, ``vitq-onnx --help`` answers without importing torch. A plain proxy, not
a module in ``sys.modules``: the import itself is an ordinary one, run whole when first needed.
"""

from __future__ import annotations

import importlib
from typing import Any


class _Deferred:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_import(name: str) -> Any:
    """``name`` as an object whose attributes are the module's, imported when first read."""
    return _Deferred(name)
