"""Does this CPU accumulate 8-bit products in int32? It decides which 8-bit layouts are exact.

onnxruntime's u8*s8 GEMMs on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add pairs of
products in int16 and saturate when both operands use their full 8-bit range; with AVX-VNNI,
AVX512-VNNI or AMX (and Arm's dot-product instructions) every product goes to int32. The default
``--target-cpu portable`` keeps every pair within int16 (8-bit weights as u8 against 8-bit inputs);
``--target-cpu vnni`` uses full-range s8 weights and operands, the fast path of those CPUs, and
such a model is refused at load on a CPU without them.
"""

from __future__ import annotations

import contextlib
import platform
from functools import cache
from pathlib import Path

from .errors import VitqError
from .formats import TARGETS

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # x86 VNNI/AMX; Arm dot product


@cache
def cpu_info() -> dict[str, str]:
    """The first core's /proc/cpuinfo fields (empty where there is none)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    info = cpu_info()
    return info.get("model name") or platform.processor() or "unknown"


def has_int8_dot() -> bool:
    flags = (cpu_info().get("flags") or cpu_info().get("Features") or "").split()
    return any(f in flags for f in INT8_DOT_FLAGS)


def check_target(target: str, what: str) -> None:
    """``what`` (a model, an export) can run exactly here, or one clear error."""
    if target not in TARGETS:
        raise VitqError(f"unknown --target-cpu '{target}': use {' or '.join(TARGETS)}")
    if target == "vnni" and not has_int8_dot():
        raise VitqError(f"{what} is for CPUs with VNNI or AMX (--target-cpu vnni): on this one ({cpu_name()}) "
                        "its full-range 8-bit products can saturate; export it with --target-cpu portable")
