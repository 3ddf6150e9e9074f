"""Is ``--max-drop``'s expected drop a better estimate of the drop on new images than counting?

    python benchmarks/drop_statistic.py -o benchmarks/results/drop_statistic.md

DeiT-Ti, as ``vitq-onnx export --max-drop`` does it: ``repq`` recipes on the same 32 calibration
images, the same greedy path. For maps spread along the path, the drop from FP32 on the 93
held-out calibration images, counted (whole images: 1.08 points each) and expected
(``mixed_precision.expected_drop``), against the drop counted on all 625 val images, which
only reports here (nothing is chosen on it). A second table chooses the smoothing on the held-out
images alone: each width's mean difference from the counted drop along the path (its bias). The
table ends with each estimate's mean absolute error against val's count, and how often the next
map along the path seems to lose less. ``--logits FILE`` keeps every map's logits;
``--reuse`` then rewrites the tables from them without calibrating.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from accuracy import CALIB, VAL, WEIGHTS
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.mixed_precision import (_sensitivities, averages, expected_drop, greedy_path,
                                                   layer_rules)
from vitq_onnx.calibration.simulation import simulate, torch_logits
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.cpu import cpu_name
from vitq_onnx.latency import machine_info
from vitq_onnx.images import Preprocess, calibration_subset, label_of, list_images, load_images, load_synsets
from vitq_onnx.models import create_model
from vitq_onnx.orchestrator.inputs import held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--maps", type=int, default=12, help="maps along the greedy path (first and last included)")
    ap.add_argument("--logits", type=Path, help="also save every map's logits and the labels here (.npz)")
    ap.add_argument("--reuse", action="store_true", help="the tables from --logits, without calibrating")
    args = ap.parse_args()
    if args.reuse:
        saved = dict(np.load(args.logits))
        write(rows_of(saved), int(saved["path_steps"]), None, args.output)
        return
    start = time.time()
    model = create_model("deit_t", WEIGHTS["deit_t"])
    pre = Preprocess.from_model(model)
    base = get_method("repq")
    calib_all = list_images(CALIB)
    paths = calibration_subset(calib_all, base.num_calib)
    images, _ = load_images(paths, pre)
    held, held_labels = held_out(calib_all, paths, CALIB, pre)
    val_paths = list_images(VAL)
    val, kept = load_images(val_paths, pre)
    synsets = load_synsets()
    val_labels = np.array([label_of(p, VAL, synsets) for p in kept])
    cap = BitWidths(8, 8)
    layers, widths = _sensitivities(model, images, cap, "deit_tiny_patch16_224", lambda m: None, False, base)
    path = greedy_path(layers, widths)
    steps = sorted({round(i * (len(path) - 1) / (args.maps - 1)) for i in range(args.maps)})
    fp = {"held": torch_logits(model, held), "val": torch_logits(model, val)}
    saved = {"held_labels": held_labels, "val_labels": val_labels, "fp_held": fp["held"], "fp_val": fp["val"],
             "path_steps": len(path) - 1}
    for step in steps:
        bits = BitWidths.parse("8/8", layer_rules(layers, path[step], 8))
        sim = simulate(model, calibrate(model, images, bits, base, "deit_tiny_patch16_224", CalibOptions(progress=False)))
        saved |= {f"q_held_{step}": torch_logits(sim, held), f"q_val_{step}": torch_logits(sim, val),
                  f"avg_{step}": np.array(averages(layers, path[step]))}
        print(json.dumps(rows_of(saved)[-1]), file=sys.stderr)
        if args.logits:
            np.savez(args.logits, **saved)
    write(rows_of(saved), len(path) - 1, time.time() - start, args.output)


def rows_of(saved: dict) -> list[dict]:
    """Per map: its averages, and the drops on both image sets (held-out: at each smoothing)."""
    rows = []
    for step in sorted(int(k.rpartition("_")[2]) for k in saved if k.startswith("q_held_")):
        row = {"step": step, **dict(zip(("weight_avg", "activation_avg"), saved[f"avg_{step}"].round(3).tolist()))}
        for part in ("held", "val"):
            fp, q, labels = saved[f"fp_{part}"], saved[f"q_{part}_{step}"], saved[f"{part}_labels"]
            row[f"{part}_counted"] = round(100 * float((fp.argmax(1) == labels).mean() - (q.argmax(1) == labels).mean()), 2)
            row[f"{part}_expected"] = round(expected_drop(fp, q, labels), 2)
        row["held_by_smoothing"] = {w: round(expected_drop(saved["fp_held"], saved[f"q_held_{step}"], saved["held_labels"], w), 2)
                                    for w in SMOOTHINGS}
        row["images"] = {"held": len(saved["held_labels"]), "val": len(saved["val_labels"])}
        rows.append(row)
    return rows


ASKED = 10  # the drops --max-drop is asked for lie below this (a destroyed model's margins all shrink to 0)
SMOOTHINGS = (0.11, 0.23, 0.45, 0.9)  # the widths tried, in median |FP margins| (0.25 to 2 logits on DeiT-Ti)


def write(rows: list[dict], path_steps: int, seconds: float | None, output: Path) -> None:
    """The tables; ``seconds`` the run's, None when rewritten from saved logits."""
    output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    held, val = rows[0]["images"]["held"], rows[0]["images"]["val"]
    asked = [r for r in rows if r["held_counted"] <= ASKED]

    def mae(key: str, among: list[dict]) -> float:
        return float(np.mean([abs(r[key] - r["val_counted"]) for r in among]))

    def reversals(key: str) -> int:
        return sum(b[key] < a[key] for a, b in zip(rows, rows[1:]))

    lines = ["# --max-drop's statistic: counted against expected drop (DeiT-Ti, repq maps along the greedy path)", "",
             f"- `python benchmarks/drop_statistic.py -o {output} --maps {len(rows)}` ({time.strftime('%Y-%m-%d %H:%M')}"
             f"{', tables rewritten from its logits' if seconds is None else f', {seconds:.0f} s'})",
             f"- CPU: {cpu_name()}, flags {', '.join(machine_info(1)['cpu_flags'])} (float kernels move the "
             "last bits of the codes)",
             f"- {held} held-out calibration images (what `--max-drop` sees), {val} val images (reported only); "
             f"greedy path of {path_steps} steps from 8/8", "",
             "| step | weight avg | activation avg | held-out counted drop | held-out expected drop | val counted drop "
             "| val expected drop |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['weight_avg']:.3f} | {r['activation_avg']:.3f} | {r['held_counted']:.2f} | "
                     f"{r['held_expected']:.2f} | {r['val_counted']:.2f} | {r['val_expected']:.2f} |")
    lines += ["", f"Against val's counted drop, mean absolute error over the maps that count at most {ASKED} points on "
              f"the held-out images: held-out counted {mae('held_counted', asked):.2f} points, held-out expected "
              f"{mae('held_expected', asked):.2f} (over every map: {mae('held_counted', rows):.2f} and "
              f"{mae('held_expected', rows):.2f}). Steps where the next map seems to lose less: "
              f"counted {reversals('held_counted')}, expected {reversals('held_expected')} of {len(rows) - 1}.", "",
              "Choosing the smoothing on the held-out images alone: the expected drop at each width (in median "
              f"|FP margins|) minus the counted drop, averaged over the {len(asked)} maps that count at most "
              f"{ASKED} points (where `--max-drop` is asked; its bias against the count):", "",
              "| smoothing | " + " | ".join(f"{w}" for w in SMOOTHINGS) + " |", "|---|" + "---|" * len(SMOOTHINGS),
              "| mean (expected − counted), held-out | " + " | ".join(
                  f"{np.mean([r['held_by_smoothing'][w] - r['held_counted'] for r in asked]):+.2f}" for w in SMOOTHINGS) + " |"]
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
