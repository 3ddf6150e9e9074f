"""Command line: ``vitq-onnx export``, ``vitq-onnx eval`` and ``vitq-onnx report``.

Exit codes: 0 done; 1 any error (a wrong option as much as unusable data), printed as one
``vitq-onnx: error: ...`` line with nothing written; 130 interrupted (Ctrl-C), nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from . import __version__
from .errors import VitqError
from .formats import RUNTIMES
from .options import OPTIONS, ExportOptions, check_options, resolved


class _Formatter(argparse.HelpFormatter):
    """Wrapped help that keeps the line breaks of listings (the methods)."""

    def _split_lines(self, text, width):
        return [line for part in text.splitlines()
                for line in textwrap.wrap(part, width, break_on_hyphens=False) or [""]]


class _Parser(argparse.ArgumentParser):
    """Usage errors like every other error: one line, exit 1."""

    def error(self, message: str):
        raise VitqError(f"{message} (see {self.prog} --help)")


def _add_export_options(e: argparse.ArgumentParser) -> None:
    """One argument per ``options.OPTIONS`` entry."""
    for o in OPTIONS:
        kwargs = {"dest": o.name, "help": o.help_text()}
        if o.switch:
            kwargs["action"] = "store_false" if o.default else "store_true"
        else:
            kwargs.update(type=o.type, metavar=o.metavar, default=o.default, required=o.required)
            if o.repeat:
                kwargs.update(action="append", default=[])
            if o.choices is not None:
                kwargs["choices"] = list(o.choices())
                kwargs["metavar"] = o.metavar or "{" + ",".join(kwargs["choices"]) + "}"
        e.add_argument(*o.cli_flags, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitq-onnx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("export", help="calibrate a timm ViT and write a quantized ONNX model",
                       formatter_class=_Formatter)
    _add_export_options(e)

    v = sub.add_parser("eval", help="top-1/top-5, size and latency of an ONNX model in onnxruntime or OpenVINO")
    v.add_argument("model", type=Path)
    v.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES,
                   help="where to run it (default onnxruntime); openvino: its CPU plugin in float32 "
                        "(pip install -e '.[openvino]'), with the top-1 agreement and largest output "
                        "difference against onnxruntime's run of the same file")
    v.add_argument("--images", type=Path, required=True,
                   help="folder of <synset>_*.JPEG files or <synset>/ subfolders")
    v.add_argument("--compare", type=Path,
                   help="second model (e.g. the FP32 one): the same numbers side by side, latencies measured "
                        "interleaved, their ratio, and the top-1 agreement of the two")
    v.add_argument("--synsets", type=Path, help="synset list (default: bundled ImageNet-1k)")
    v.add_argument("--batch-size", type=int, default=16, help="images per run for accuracy")
    v.add_argument("--latency-batch", type=int, default=8,
                   help="batch size of the second latency measurement (batch 1 always; default 8)")
    v.add_argument("--threads", type=int, help="threads for latency (default: the cores this "
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
    r.add_argument("--sort", default="quant_sqnr",
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
    opts = ExportOptions(**{o.name: tuple(getattr(args, o.name)) if o.repeat else getattr(args, o.name)
                            for o in OPTIONS})
    check_options(opts)
    from .orchestrator import export  # torch and the rest load here, after the arguments are read

    print(json.dumps(export(resolved(opts))))


def _eval(args) -> None:
    from .evaluate import LatencyOptions, evaluate
    from .images import list_images
    from .outputs import check_outputs, staged

    for name in ("batch_size", "latency_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise VitqError(f"--{name.replace('_', '-')} must be at least 1")
    if args.json is not None:
        check_outputs([args.json], [args.model, args.compare, args.synsets, *list_images(args.images)])
    latency = None if args.no_latency else LatencyOptions(
        args.threads or len(os.sched_getaffinity(0)), args.latency_batch)
    result = evaluate(args.model, args.images, args.compare, args.synsets, args.batch_size,
                      progress=not args.quiet, latency=latency, runtime_name=args.runtime)
    print(_summary(result, args.model.name) + (f"  in {args.runtime}" if args.runtime != "onnxruntime" else ""))
    if "onnxruntime" in result:
        ref = result["onnxruntime"]
        print(f"the same file in onnxruntime: " + (f"top-1 {ref['top1']:.2%}  agreement {ref['top1_agreement']:.2%}  "
                                                   if "top1" in ref else "") +
              f"max |output difference| {ref['max_abs_output_difference']:.4g}")
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
        engine = m.get("runtime", "onnxruntime")
        print(f"on {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), {m['intra_op_threads']} threads, "
              f"{engine} {m[engine]}")
    if args.json:
        with staged(args.json.parent) as tmp:
            (tmp / args.json.name).write_text(json.dumps(result, indent=1))


def _report(args) -> None:
    from .images import list_images
    from .outputs import check_outputs, staged
    from .layer_report import SORT_KEYS, csv_text, layer_report, plot, sorted_rows, table_text

    outputs = [p for p in (args.json, args.csv, args.plot) if p is not None]
    if args.sort not in SORT_KEYS:
        raise VitqError(f"unknown --sort '{args.sort}': use one of {', '.join(SORT_KEYS)}")
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
