"""Fast tier: every export option is declared once and reachable from the CLI and the Python API,
with errors worded for each caller."""

import inspect
from pathlib import Path

import pytest

import vitq_onnx
from vitq_onnx.cli import _parser, main
from vitq_onnx.errors import VitqError
from vitq_onnx.options import OPTIONS, api_wording, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = {o.name for o in OPTIONS}


def _export_parser():
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sub.choices["export"]


def test_every_option_is_a_cli_flag_and_an_api_keyword():
    cli = {a.dest for a in _export_parser()._actions if a.dest != "help"}
    api = set(inspect.signature(vitq_onnx.export).parameters)
    assert cli == NAMES, (cli ^ NAMES)
    assert api == NAMES, (api ^ NAMES)


def test_each_flag_sets_its_own_field():
    values = {"model": "deit_t", "bits": "4/4", "calib": "c", "output": "o.onnx", "method": "ias", "avg_bits": "5",
              "max_drop": "1", "weights": "w.pth", "img_size": "448", "num_classes": "0", "num_calib": "9",
              "recipe": "r.json", "seed": "3", "device": "cuda", "time_budget": "2", "search": "evol",
              "search_budget": "1", "search_fitness": "mse", "format": "qdq", "target_cpu": "vnni",
              "save_passes": "p", "validate_images": "4", "min_agreement": "0.5", "layer_bits": "a=8/8",
              "keep_float": "head"}
    for o in OPTIONS:
        argv = ["export", "--model", "m", "--calib", "c", "-o", "o.onnx"]
        flag = o.cli_flags[-1]
        argv += [flag] if o.switch else [flag, values[o.name]]
        args = _export_parser().parse_args(argv[1:])
        value = getattr(args, o.name)
        if o.switch:
            assert value is (not o.default), o.name
        else:
            expected = o.type(values[o.name])
            assert value == ([expected] if o.repeat else expected), o.name


@pytest.mark.parametrize("cli, api, cli_says, api_says", [
    (["--avg-bits", "9"], {"avg_bits": 9}, "--avg-bits must be between 3 and 8", "avg_bits must be between 3 and 8"),
    (["--num-calib", "0"], {"num_calib": 0}, "--num-calib must be at least 1", "num_calib must be at least 1"),
    (["--avg-bits", "5", "--max-drop", "1"], {"avg_bits": 5, "max_drop": 1}, "--avg-bits and --max-drop",
     "avg_bits and max_drop"),
    (["--recipe", "r.json", "--bits", "4/4"], {"recipe": "r.json", "bits": "4/4"}, "drop --bits", "drop bits"),
    (["--search-budget", "2"], {"search_budget": 2}, "add --search evol", "add search=evol"),
    (["--format", "onnx"], {"format": "onnx"}, "argument --format: invalid choice", "unknown format 'onnx'"),
    (["--min-agreement", "2"], {"min_agreement": 2}, "--min-agreement must be a share", "min_agreement must be"),
])
def test_errors_are_worded_for_each_caller_before_any_work(cli, api, cli_says, api_says, capsys, tmp_path):
    assert main(["export", "--model", "deit_t", "--calib", str(tmp_path), "-o", str(tmp_path / "m.onnx"), *cli]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitq-onnx: error:") and cli_says in err[0], err
    api = {**api, "bits": api.get("bits")}
    with pytest.raises(VitqError) as info:
        vitq_onnx.export("deit_t", calib=tmp_path, **api)
    assert api_says in str(info.value) and "--" not in str(info.value), str(info.value)
    assert not list(tmp_path.iterdir())


def test_api_refuses_an_unknown_keyword():
    with pytest.raises(VitqError, match="unknown keyword 'avg_bit'"):
        vitq_onnx.export("deit_t", "4/4", "calib", avg_bit=4)


def test_api_wording_of_flags_with_values_and_switches():
    assert api_wording("no pretrained weights: pass --weights FILE (.pth), or --random-weights for graph tests") == \
        "no pretrained weights: pass weights=FILE (.pth), or random_weights=True for graph tests"
    assert api_wording("--keep-float pattern 'x' matches nothing") == "keep_float pattern 'x' matches nothing"


def test_readme_options_table_is_the_declared_one():
    text = README.read_text()
    start = text.index("<!-- options table")
    table = text[text.index("\n", start) + 1:text.index("<!-- end of options table -->")].strip()
    assert table == markdown_table(), "README's options table is stale: paste vitq_onnx.options.markdown_table()"
