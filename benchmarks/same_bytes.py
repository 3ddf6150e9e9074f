"""Do exports still give the same bytes? sha256 of every file a set of exports writes.

    python benchmarks/same_bytes.py -o runs/bytes/after.json            # export and hash
    python benchmarks/same_bytes.py --compare runs/bytes/before.json runs/bytes/after.json \
        --table benchmarks/results/same_bytes.md                        # the before/after table

A refactor changes no output: run the first command on the commit before the change (e.g. from
a ``git worktree`` with ``PYTHONPATH`` pointing at it) and after it, then compare. Exports are
reproducible on one machine (their float kernels decide the last bits, so compare on the same
CPU). ``--time-budget`` sets iterations from the clock, so the reconstruction cases here use
``*-short`` copies of ``repq-recon`` and ``ias`` with a fixed few iterations per block instead:
the same code paths, deterministic.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEIT = ["--model", "deit_t", "--weights", str(SHARED / "models" / "deit_tiny_patch16_224.safetensors")]
SHORT_ITERS = 4  # reconstruction iterations per block in the *-short methods

# name -> CLI arguments after ``export`` (``--calib`` and ``-o`` are added)
CASES = {
    "repq-8-8": [*DEIT, "--bits", "8/8", "--method", "repq"],
    "repq-4-4": [*DEIT, "--bits", "4/4", "--method", "repq"],
    "ias-short-4-4": [*DEIT, "--bits", "4/4", "--method", "ias-short"],
    "ias-short-6-6-qdq": [*DEIT, "--bits", "6/6", "--method", "ias-short", "--format", "qdq"],
    "repq-recon-short-4-4": [*DEIT, "--bits", "4/4", "--method", "repq-recon-short"],
    "avg-bits-5": [*DEIT, "--avg-bits", "5", "--method", "repq"],
    "keep-float-av-4-4": [*DEIT, "--bits", "4/4", "--method", "repq", "--keep-float", "blocks.8.attn.matmul_av"],
    "repq-4-4-qdq": [*DEIT, "--bits", "4/4", "--method", "repq", "--format", "qdq"],
    "mptq-4-4": [*DEIT, "--bits", "4/4", "--method", "mptq"],
    "repq-8-8-vnni": [*DEIT, "--bits", "8/8", "--method", "repq", "--target-cpu", "vnni"],
    "swin-t-random-4-4": ["--model", "swin_t", "--random-weights", "--bits", "4/4", "--method", "repq",
                          "--num-calib", "8"],
}
SUFFIXES = (".onnx", ".recipe.json", ".recipe.npz")


def register_short_methods() -> None:
    """``repq-recon-short`` and ``ias-short``: the registered methods with SHORT_ITERS iterations."""
    from vitq_onnx.calibration import methods
    from vitq_onnx.calibration.reconstruct import BlockReconstruction

    for name in ("repq-recon", "ias"):
        method = methods.get_method(name)
        stages = []
        for stage in method.stages:
            if isinstance(stage, BlockReconstruction):
                stage = copy.copy(stage)
                stage.iters, stage.wide_iters = SHORT_ITERS, None
            stages.append(stage)
        short = f"{name}-short"
        methods.METHODS[short] = methods.Method(short, method.description, tuple(stages), method.num_calib)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(out: Path, cases: list[str], folder: Path) -> None:
    from vitq_onnx.cli import main

    register_short_methods()
    folder.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    calib = SHARED / "data" / "imagenet-sample" / "calib"
    for name in cases:
        onnx_path = folder / f"{name}.onnx"
        start = time.time()
        code = main(["export", *CASES[name], "--calib", str(calib), "-o", str(onnx_path), "-q"])
        if code != 0:
            sys.exit(f"{name}: export failed ({code})")
        files = [onnx_path.with_name(onnx_path.stem + s) for s in SUFFIXES]
        result[name] = {f.name.removeprefix(name): sha256(f) for f in files}
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)
        out.write_text(json.dumps(result, indent=1))


def compare(before: Path, after: Path, table: Path | None) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    lines = ["| export | file | sha256 before | sha256 after | same |", "|---|---|---|---|---|"]
    differ = 0
    for name in a:
        for suffix, digest in a[name].items():
            new = b.get(name, {}).get(suffix)
            same = new == digest
            differ += not same
            lines.append(f"| {name} | {suffix} | {digest[:16]} | {(new or '-')[:16]} | {'yes' if same else '**no**'} |")
    text = "\n".join(lines) + f"\n\n{sum(len(v) for v in a.values()) - differ} of " \
                              f"{sum(len(v) for v in a.values())} files identical\n"
    print(text)
    if table is not None:
        table.write_text(f"# Same bytes before and after\n\n`python benchmarks/same_bytes.py --compare {before} "
                         f"{after}`\n\n" + text)
    return 1 if differ else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, help="JSON of sha256 per export and file")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--folder", type=Path, default=Path("runs/bytes/models"), help="where the exports go")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    p.add_argument("--table", type=Path, help="with --compare: also write the table here (markdown)")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare, args.table))
    if args.output is None:
        p.error("give -o FILE or --compare BEFORE AFTER")
    run(args.output, args.cases, args.folder)


if __name__ == "__main__":
    main()
