"""onnxruntime's float vs integer GEMM kernels on DeiT-Ti's Linear shapes (batch 1, 2 threads).

    python benchmarks/gemm_kernels.py -o benchmarks/results/gemm_kernels.md

Why integer kernels alone cannot make a quantized ViT much faster on a CPU without VNNI: the
median of 50 runs of one MatMul / MatMulInteger node per shape, A [197, K] (tokens), B constant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [("qkv", 192, 576), ("proj", 192, 192), ("fc1", 192, 768), ("fc2", 768, 192)]
KERNELS = {"float32": (TensorProto.FLOAT, TensorProto.FLOAT), "u8·u8": (TensorProto.UINT8, TensorProto.UINT8),
           "u8·s8": (TensorProto.UINT8, TensorProto.INT8)}
NP = {TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def time_gemm(m: int, k: int, n: int, a_type: int, b_type: int, threads: int) -> float:
    rng = np.random.default_rng(0)
    b = (rng.standard_normal((k, n)) * 40).clip(-128, 127).astype(NP[b_type]) if b_type != TensorProto.UINT8 \
        else rng.integers(0, 256, (k, n)).astype(np.uint8)
    op = "MatMul" if a_type == TensorProto.FLOAT else "MatMulInteger"
    out = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", out, [m, n])], [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k)).astype(NP[a_type]) if a_type != TensorProto.FLOAT \
        else rng.standard_normal((m, k)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"a": a})
    runs = []
    for _ in range(50):
        start = time.perf_counter()
        sess.run(None, {"a": a})
        runs.append(time.perf_counter() - start)
    return float(np.median(runs)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    lines = ["| layer | M×K·K×N | " + " | ".join(f"{k} µs" for k in KERNELS) + " | float32 / u8·s8 | float32 / u8·u8 |",
             "|---|---|" + "---|" * (len(KERNELS) + 2)]
    for name, k, n in SHAPES:
        t = {kern: time_gemm(197, k, n, *types, args.threads) for kern, types in KERNELS.items()}
        lines.append(f"| {name} | 197×{k}·{k}×{n} | " + " | ".join(f"{v:.0f}" for v in t.values())
                     + f" | {t['float32'] / t['u8·s8']:.2f} | {t['float32'] / t['u8·u8']:.2f} |")
        print(lines[-1])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(f"onnxruntime {ort.__version__}, {args.threads} threads, median of 50 runs\n\n"
                           + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
