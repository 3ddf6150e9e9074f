"""Where the time goes: onnxruntime's profiler, per op type, for some models side by side.

    python benchmarks/op_profile.py runs/speed/fp32.onnx runs/speed/vitq-w8a8-ort.onnx --batch 1 \\
        -o benchmarks/results/op_profile.md

Each model runs ``--runs`` times on one fixed batch of random pixels (intra-op threads ``--threads``,
default graph optimizations) after a warm-up; the profiler's per-node kernel times are summed by
op type and divided by the runs: ms per inference, and each op type's share of the model's total.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitq_onnx.latency import machine_info


def profile(model: Path, batch: int, runs: int, threads: int) -> dict[str, float]:
    """ms per inference spent in each op type."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = f"/tmp/op_profile_{os.getpid()}_{model.stem}"
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = [d if isinstance(d, int) else 224 for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal([batch, *size]).astype(np.float32)
    warmup = 5
    for _ in range(warmup + runs):
        sess.run(None, {inp.name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    measured_from = starts[warmup]  # the warm-up runs' nodes are left out
    times: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= measured_from:
            times[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    profiles = {m.stem: profile(m, args.batch, args.runs, args.threads) for m in args.models}
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in profiles.values()))
    m = machine_info(args.threads)
    lines = [f"# Op-time profile, batch {args.batch} ({args.runs} runs, {args.threads} threads)", "",
             f"{m['cpu']} ({', '.join(m['cpu_flags'])}), onnxruntime {m['onnxruntime']}; "
             f"`python benchmarks/op_profile.py {' '.join(map(str, args.models))} --batch {args.batch}`", "",
             "| op type | " + " | ".join(f"{n} ms (%)" for n in profiles) + " |",
             "|---|" + "---|" * len(profiles)]
    totals = {n: sum(p.values()) for n, p in profiles.items()}
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(
            f"{p[op]:.2f} ({100 * p[op] / totals[n]:.0f})" if op in p else "-" for n, p in profiles.items()) + " |")
    lines.append("| **total (kernels)** | " + " | ".join(f"**{t:.2f}**" for t in totals.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
