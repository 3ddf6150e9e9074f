"""onnx's reference implementation (``onnx.reference.ReferenceEvaluator``) against onnxruntime on
exported files, and the first tensor where they part.

    python benchmarks/reference.py runs/runtimes/repq_w*_qdq.onnx --images 8 -o benchmarks/results/reference.md

For each file: top-1 agreement and max |logit difference| of the two on the first --images val
images; where they differ, on the image that differs most, the first node (graph order) whose
output differs, what share of that output differs and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from vitq_onnx import runtime
from vitq_onnx.evaluate import preprocess_of
from vitq_onnx.images import list_images, load_images
from vitq_onnx.latency import machine_info

REPO = Path(__file__).resolve().parents[1]
VAL = Path(os.environ.get("VITQ_SHARED", REPO.parent / "shared")) / "data" / "imagenet-sample" / "val"


def first_difference(model: onnx.ModelProto, x: np.ndarray) -> dict | None:
    """The first node, in graph order, whose output onnxruntime and the reference compute differently."""
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    packed = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)  # (onnxruntime cannot hand these to numpy)
    names = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o and types.get(o) not in packed]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = runtime.session(probe)
    ours = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    theirs = dict(zip(names, ReferenceEvaluator(probe).run(names, {sess.get_inputs()[0].name: x})))
    for node in model.graph.node:
        for out in node.output:
            if out in ours and not np.array_equal(ours[out], theirs[out]):
                a, b = ours[out].astype(np.float64), theirs[out].astype(np.float64)
                return {"node": node.name, "op": node.op_type, "share_differing": float((a != b).mean()),
                        "max_abs_difference": float(np.abs(a - b).max())}
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    rows = []
    for path in args.models:
        x, _ = load_images(list_images(VAL)[:args.images], preprocess_of(path, runtime.file_metadata(path)))
        model = onnx.load(path)
        ours = runtime.run(runtime.session(model), x)
        theirs = np.concatenate([ReferenceEvaluator(model).run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
        row = {"model": path.name, "images": len(x), "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
               "max_abs_logit_difference": float(np.abs(ours - theirs).max()), "first_difference": None}
        if row["max_abs_logit_difference"] > 0:
            worst = int(np.abs(ours - theirs).max(1).argmax())  # the image that differs most
            row["first_difference"] = {"image": worst, **first_difference(model, x[worst:worst + 1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    m = machine_info(1)
    lines = ["# onnx reference implementation vs onnxruntime on exported files", "",
             f"- {m['cpu']} ({', '.join(m['cpu_flags'])}); onnxruntime {m['onnxruntime']}, onnx {m['onnx']}; "
             f"first {args.images} val images", f"- command: `python benchmarks/reference.py {' '.join(sys.argv[1:])}` "
             f"({m['date']})", "",
             "| file | top-1 agreement | max abs logit diff | first differing node (on the image that differs most) | share differing | max diff there |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["first_difference"] or {}
        lines.append(f"| {r['model']} | {100 * r['top1_agreement']:.2f} % | {r['max_abs_logit_difference']:.3g} "
                     f"| {d.get('node', '—')} {'(' + d['op'] + ')' if d else ''} "
                     f"| {d.get('share_differing', 0):.3f} | {d.get('max_abs_difference', 0):.3g} |")
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
