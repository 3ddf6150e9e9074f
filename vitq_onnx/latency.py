"""Latency in onnxruntime or OpenVINO, measured as the benchmarks do, and the machine it was measured on.

Models are interleaved (round r starts with model r mod n) in blocks of runs, so a drift of the
machine (turbo, another process) hits every model alike; a ratio is the median of the per-round
ratios. The CPU's int8 flags are reported because they pick onnxruntime's integer kernels.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort

from .cpu import cpu_info, cpu_name
from .progress import Progress
from . import runtimes
from .runtimes import Runner

WARMUP_RUNS = 3
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")  # what picks the int8 (and bf16) kernels


def machine_info(threads: int, runtime_name: str = "onnxruntime") -> dict:
    flags = [f for f in INT8_FLAGS if f in cpu_info().get("flags", "").split()]
    engine = {"provider": "CPUExecutionProvider"} if runtime_name == "onnxruntime" else {
        "runtime": runtime_name, runtime_name: runtimes.version(runtime_name), "config": runtimes.OPENVINO_CONFIG}
    return {"cpu": cpu_name(), "cpu_flags": flags, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "amx": "amx_int8" in flags, "logical_cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "python": platform.python_version(), "intra_op_threads": threads,
            "inter_op_threads": 1, **engine, "date": time.strftime("%Y-%m-%d %H:%M")}


def measure_latency(runners: dict[str, Runner], inputs: dict[int, np.ndarray], rounds: int,
                    runs_per_block: int, progress: bool = True) -> dict[str, dict]:
    """Per model and batch size: block medians (ms) of every round, interleaving the models
    (loaded ones, ``runtimes.load``: onnxruntime and OpenVINO alike)."""
    names = list(runners)
    blocks = {name: {b: [] for b in inputs} for name in names}
    for batch, x in inputs.items():
        for name, run in runners.items():
            for _ in range(WARMUP_RUNS):
                run(x)
        bar = Progress(rounds, f"latency batch {batch}", progress, unit="round")
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                blocks[name][batch].append(_timed_block(runners[name], x, runs_per_block))
            bar.update(1)
        bar.close()
    return blocks


def _timed_block(run: Runner, x: np.ndarray, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def median_ms(blocks: dict[str, dict], name: str) -> dict[int, float]:
    return {batch: float(np.median(ms)) for batch, ms in blocks[name].items()}


def ratio(blocks: dict[str, dict], name: str, reference: str) -> dict[int, float]:
    """Median over rounds of ``name``'s block time over ``reference``'s in the same round."""
    return {batch: float(np.median(np.array(ms) / np.array(blocks[reference][batch])))
            for batch, ms in blocks[name].items()}
