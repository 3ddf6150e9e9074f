"""Plot benchmarks/speed.py's results: val top-1 against batch-1 latency relative to FP32.

    python benchmarks/plot_speed.py benchmarks/results/speed.json      # writes speed.png beside it

speed.py calls ``plot`` itself; this command only redraws from a saved .json. Needs matplotlib
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {  # (kind, format) -> legend label, marker, colour
    ("fp32", "float"): ("FP32", "*", "black"),
    ("ort", "QDQ (quantize_static)"): ("onnxruntime quantize_static (QDQ)", "s", "tab:blue"),
    ("vitq", "ort"): ("vitq-onnx --format ort", "o", "tab:orange"),
    ("vitq", "qdq"): ("vitq-onnx --format qdq", "^", "tab:green"),
}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in data["rows"] if r.get("top1") is not None and r.get("b1_ratio") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen = set()
    for r in rows:
        label, marker, colour = STYLE.get((r["kind"], r["format"]), (r["kind"], "x", "gray"))
        ax.scatter(r["b1_ratio"], 100 * r["top1"], marker=marker, color=colour, s=90 if marker == "*" else 50,
                   label=None if label in seen else label, zorder=3)
        seen.add(label)
        ax.annotate(f"W{r['bits'].replace('/', 'A')}" if r["bits"] else "FP32", (r["b1_ratio"], 100 * r["top1"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--", zorder=1)
    ax.set_xscale("log")
    times = FuncFormatter(lambda x, _: f"{x:g}×")
    ax.xaxis.set_major_formatter(times)
    ax.xaxis.set_minor_formatter(times)
    ax.set_xlabel("batch-1 latency / FP32 latency (log scale; left of the dashed line is faster than FP32)")
    ax.set_ylabel(f"top-1 on {data['settings']['val_images']} val images (%)")
    m = data["machine"]
    ax.set_title(f"DeiT-Ti in onnxruntime {m['onnxruntime']}, {m['intra_op_threads']} threads, {m['cpu']}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="speed.json written by benchmarks/speed.py")
    p.add_argument("-o", "--output", type=Path, help="image path (default: the .json's name with .png)")
    args = p.parse_args()
    plot(json.loads(args.json.read_text()), args.output or args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
