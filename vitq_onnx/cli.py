"""Command line: ``vitq-onnx export``, ``vitq-onnx eval`` and ``vitq-onnx report``.

Exit codes: 0 done; 1 any error (a wrong option as much as unusable data), printed as one
``vitq-onnx: error: ...`` line with nothing written; 130 interrupted (Ctrl-C), nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .calibration.methods import FITNESSES, METHODS, SEARCH_IMAGES, SEARCHES
from .cpu import TARGETS
from .errors import VitqError
from .layer_report import SORT_KEYS
from .models import SHORT_NAMES
from .outputs import check_outputs, staged
from .passes import FORMATS


class _Parser(argparse.ArgumentParser):
    """Usage errors like every other error: one line, exit 1."""

    def error(self, message: str):
        raise VitqError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitq-onnx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("export", help="calibrate a timm ViT and write a quantized ONNX model",
                       formatter_class=argparse.RawTextHelpFormatter)
    e.add_argument("--model", required=True, help=f"{', '.join(SHORT_NAMES)} or a timm model name")
    e.add_argument("--bits", help="weight/activation bits W/A, each 2..8 (default 8/8)")
    e.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=W/A",
                   help="bits for the layers whose timm module name matches the glob (repeatable, last "
                        "match wins), e.g. 'blocks.11.*=8/8'")
    e.add_argument("--avg-bits", type=float, metavar="B",
                   help="greedy mixed precision: each layer's width from {8,6,5,4,3} (at most --bits, default "
                        "8/8) so that the average weight and activation widths are at most B, narrowing the "
                        "layers whose output changes least (the map is printed and stored)")
    e.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="greedy mixed precision by accuracy: the narrowest map along the same greedy path whose "
                        "top-1 on the calibration images that do not calibrate (labelled by synset) is at most "
                        "POINTS below the FP model's there")
    e.add_argument("--keep-float", "--exclude", action="append", default=[], metavar="PATTERN",
                   dest="keep_float",
                   help="keep the layers whose timm module name (or a parent's) matches the glob float in the "
                        "graph, the simulation and the recipe (repeatable), e.g. 'blocks.11.*', head, "
                        "patch_embed, blocks.3.attn.matmul_av (the attention's softmax @ v)")
    e.add_argument("--weights", type=Path, help=".safetensors/.pth/.pt checkpoint (loaded safely)")
    e.add_argument("--img-size", type=int, metavar="PX",
                   help="build the timm model at this input resolution (default: its own), e.g. 224 for a "
                        "518-px DINOv2 backbone")
    e.add_argument("--num-classes", type=int, metavar="N",
                   help="classifier outputs (default: the model's); 0 exports the features (a backbone: "
                        "validated by cosine similarity instead of top-1 agreement)")
    e.add_argument("--random-weights", action="store_true", help="random weights, for graph tests")
    e.add_argument("--calib", type=Path, required=True, help="folder of calibration images")
    e.add_argument("--num-calib", type=int, help="calibration images to use (default: the method's, "
                   + ", ".join(f"{m.name} {m.num_calib}" for m in METHODS.values()) + ")")
    e.add_argument("--recipe", type=Path,
                   help="deploy this .recipe.json (from an earlier export) instead of calibrating: the same "
                        "calibration in another --format (the images of --calib only validate), or refined "
                        "with --search")
    e.add_argument("--method", choices=list(METHODS), metavar="METHOD",
                   help="calibration method (default repq):\n" + "\n".join(
                       f"  {m.name}: {m.description}" for m in METHODS.values()))
    e.add_argument("--seed", type=int, default=0, help="seed of every random choice in calibration (default 0)")
    e.add_argument("--device", default="cpu",
                   help="torch device for calibration, e.g. cuda (default cpu); the simulation and "
                        "validation always run the CPU kernels the graph runs")
    e.add_argument("--time-budget", type=float, metavar="MIN",
                   help="minutes for optimizing stages (block reconstruction): fewer iterations when "
                        "they would take longer (default: the method's iterations, deterministic)")
    e.add_argument("--search", choices=list(SEARCHES),
                   help="end the calibration (or refine a --recipe) with a search: evol = Evol-Q's evolutionary "
                        f"search of the scales (default images: {SEARCH_IMAGES}, a quarter of them held out to stop it)")
    e.add_argument("--search-budget", type=float, metavar="MIN",
                   help="minutes the search may take; it keeps the best found when they are spent (default 9.5)")
    e.add_argument("--search-fitness", default="infonce", choices=FITNESSES,
                   help="what the search minimizes against the FP logits (default infonce; mse: the ablation)")
    e.add_argument("--format", default="ort", choices=FORMATS,
                   help="ort: 8-bit containers for onnxruntime's integer kernels; qdq: portable, int4 packed")
    e.add_argument("--target-cpu", default="portable", choices=TARGETS,
                   help="portable: exact on any x86-64 or Arm CPU (8-bit weights as u8 against 8-bit inputs); "
                        "vnni: full-range s8 operands, faster on CPUs with AVX-VNNI, AVX512-VNNI or AMX and "
                        "refused at load on others (default portable)")
    e.add_argument("--save-passes", type=Path, help="write the model after every pass to this folder")
    e.add_argument("--validate-images", type=int, default=8, metavar="N",
                   help="images of --calib on which the model is checked against the simulation and the FP "
                        "model (default 8; the simulation costs about one float forward each)")
    e.add_argument("--min-agreement", type=float, default=0.9,
                   help="fail if onnxruntime agrees with the simulation on fewer of those images")
    e.add_argument("--strict", action="store_true",
                   help="fail (instead of warning) when the quantized model agrees with the FP model on "
                        "fewer than half of the calibration images")
    e.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    v = sub.add_parser("eval", help="top-1/top-5, size and latency of an ONNX model with onnxruntime")
    v.add_argument("model", type=Path)
    v.add_argument("--images", type=Path, required=True,
                   help="folder of <synset>_*.JPEG files or <synset>/ subfolders")
    v.add_argument("--compare", type=Path,
                   help="second model (e.g. the FP32 one): the same numbers side by side, latencies measured "
                        "interleaved, their ratio, and the top-1 agreement of the two")
    v.add_argument("--synsets", type=Path, help="synset list (default: bundled ImageNet-1k)")
    v.add_argument("--batch-size", type=int, default=16, help="images per onnxruntime run for accuracy")
    v.add_argument("--latency-batch", type=int, default=8,
                   help="batch size of the second latency measurement (batch 1 always; default 8)")
    v.add_argument("--threads", type=int, help="onnxruntime threads for latency (default: the cores this "
                   "process may use)")
    v.add_argument("--no-latency", action="store_true", help="accuracy and size only")
    v.add_argument("--json", type=Path, help="also write the result here (schema: README)")
    v.add_argument("-q", "--quiet", action="store_true")

    r = sub.add_parser("report", help="per-tensor error of an exported model against the FP model, worst first")
    r.add_argument("model", type=Path, help="a vitq-onnx .onnx model, its .recipe.json beside it")
    r.add_argument("--images", type=Path, required=True, help="folder of images (e.g. the calibration folder)")
    r.add_argument("--num-images", type=int, default=32, help="a fixed random subset of the folder (default 32)")
    r.add_argument("--weights", type=Path, help="the FP checkpoint the model was exported from")
    r.add_argument("--random-weights", action="store_true", help="for a model exported with --random-weights")
    r.add_argument("--sort", choices=list(SORT_KEYS), default="quant_sqnr",
                   help="worst first by quant_sqnr: the error the tensor's own quantizer adds, what --keep-float "
                        "removes (default); sqnr: against the FP model (it piles up along the depth); "
                        "block_sqnr: of the block output; or depth: forward order")
    r.add_argument("--top", type=int, help="print only the first N rows (the files hold them all)")
    r.add_argument("--json", type=Path, help="write the report as JSON")
    r.add_argument("--csv", type=Path, help="write the table as CSV")
    r.add_argument("--plot", type=Path, help="plot SQNR along the depth (.png, .svg, .pdf; needs matplotlib)")
    r.add_argument("-q", "--quiet", action="store_true")
    return p


def _export(args) -> None:
    from .pipeline import ExportOptions, export

    if args.recipe is not None and (args.bits or args.method or args.layer_bits or args.keep_float or args.avg_bits
                                    or args.max_drop is not None
                                    or args.time_budget):
        raise VitqError("--recipe already fixes the bits and the calibration: drop --bits, --layer-bits, "
                        "--keep-float, --method, --avg-bits, --max-drop and --time-budget")
    report = export(ExportOptions(
        model=args.model, bits=args.bits or "8/8", output=args.output, calib=args.calib, weights=args.weights,
        random_weights=args.random_weights, num_calib=args.num_calib, method=args.method or "repq",
        recipe=args.recipe,
        layer_bits=tuple(args.layer_bits), keep_float=tuple(args.keep_float), avg_bits=args.avg_bits, max_drop=args.max_drop,
        seed=args.seed, device=args.device,
        time_budget=args.time_budget, search=args.search, search_budget=args.search_budget,
        search_fitness=args.search_fitness,
        format=args.format, target_cpu=args.target_cpu, save_passes=args.save_passes, min_agreement=args.min_agreement,
        validate_images=args.validate_images, img_size=args.img_size, num_classes=args.num_classes,
        strict=args.strict, progress=not args.quiet))
    print(json.dumps(report))


def _eval(args) -> None:
    from .evaluate import LatencyOptions, evaluate
    from .images import list_images

    for name in ("batch_size", "latency_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise VitqError(f"--{name.replace('_', '-')} must be at least 1")
    if args.json is not None:
        check_outputs([args.json], [args.model, args.compare, args.synsets, *list_images(args.images)])
    latency = None if args.no_latency else LatencyOptions(
        args.threads or len(os.sched_getaffinity(0)), args.latency_batch)
    result = evaluate(args.model, args.images, args.compare, args.synsets, args.batch_size,
                      progress=not args.quiet, latency=latency)
    print(_summary(result, args.model.name))
    if "compare" in result:
        sim = result.get("feature_similarity")
        print(_summary(result["compare"], args.compare.name) + (
            f"  feature cosine mean {sim['cosine_mean']:.4f} min {sim['cosine_min']:.4f}" if sim else
            f"  top-1 agreement {result['top1_agreement']:.2%}"))
    if "latency_ratio" in result:
        print(f"latency {args.model.name} / {args.compare.name}: " + ", ".join(
            f"batch {b} {r:.2f}x" for b, r in result["latency_ratio"].items()))
    if "machine" in result:
        m = result["machine"]
        print(f"on {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), {m['intra_op_threads']} threads, "
              f"onnxruntime {m['onnxruntime']}")
    if args.json:
        with staged(args.json.parent) as tmp:
            (tmp / args.json.name).write_text(json.dumps(result, indent=1))


def _report(args) -> None:
    from .images import list_images
    from .layer_report import csv_text, layer_report, plot, sorted_rows, table_text

    outputs = [p for p in (args.json, args.csv, args.plot) if p is not None]
    if args.top is not None and args.top < 1:
        raise VitqError("--top must be at least 1")
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise VitqError(f"--plot {args.plot}: use a .png, .svg or .pdf file")
    check_outputs(outputs, [args.model, args.weights, *list_images(args.images)])
    report = layer_report(args.model, args.images, args.num_images, args.weights, args.random_weights,
                          progress=not args.quiet)
    rows = sorted_rows(report, args.sort)
    out = report["output"]
    check = (f"top-1 agreement with onnxruntime {out['onnx_top1_agreement']:.2%}" if "onnx_top1_agreement" in out
             else f"feature cosine to onnxruntime {out['onnx_feature_cosine']:.4f}")
    print(f"{report['model']}: {report['quantized_tensors']} quantized tensors, {report['float_layers']} kept float, "
          f"{report['images']} images; output against the FP model: SQNR {out['sqnr_db']:.2f} dB, cosine "
          f"{out['cosine']:.4f} ({check})")
    print(table_text(rows[:args.top]))
    files = {args.json: lambda: json.dumps(report, indent=1).encode(), args.csv: lambda: csv_text(rows).encode(),
             args.plot: lambda: plot(report, args.plot.suffix.lower()[1:])}
    for path, render in files.items():
        if path is not None:
            content = render()
            with staged(path.parent) as tmp:
                (tmp / path.name).write_bytes(content)


def _summary(r: dict, name: str) -> str:
    scores = f"top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  " if "top1" in r else ""
    line = f"{name}: {scores}{r['model_bytes'] / 2**20:.1f} MB"
    if "latency_ms" in r:
        line += "  " + "  ".join(f"batch {b} {ms:.2f} ms" for b, ms in r["latency_ms"].items())
    return line + (f"  ({r['images']} images)" if "images" in r else "")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        {"export": _export, "eval": _eval, "report": _report}[args.command](args)
    except VitqError as exc:
        print(f"vitq-onnx: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vitq-onnx: interrupted: no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
