"""Ordinary mistakes and interruptions, on the tiny model: one error line, the documented exit
code, no file created or changed, no temporary left; and reproducible, inspectable artifacts."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitq_onnx.orchestrator import recipe_source, validation
from vitq_onnx.cli import main
from vitq_onnx.passes.snapshot import SHAPES_UNKNOWN

from .conftest import TINY, _tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def _state(*folders: Path) -> dict[Path, str]:
    """Every file under the folders (hidden temporaries too) with its sha256."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def _error(capsys, code: int, args: list[str], match: str) -> None:
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitq-onnx: error:") and match in err[0], err


@pytest.fixture
def work(tmp_path, tiny_calib_dir):
    """A weights file, a calibration folder and an output folder, all owned by the test."""
    torch.manual_seed(0)
    weights = tmp_path / "in" / "tiny.safetensors"
    weights.parent.mkdir()
    save_file(_tiny_vit().state_dict(), str(weights))
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in tiny_calib_dir.iterdir():
        (calib / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    base = ["export", "--model", TINY, "--weights", str(weights), "--calib", str(calib), "--num-calib", "8", "-q"]
    return tmp_path, base, out


def test_outputs_never_overwrite_inputs(work, capsys):
    tmp, base, out = work
    before = _state(tmp)
    image = next((tmp / "calib").iterdir())
    _error(capsys, 1, base + ["-o", str(image)], "would overwrite the input")
    _error(capsys, 1, base + ["-o", str(tmp / "in" / "tiny.safetensors")], "would overwrite the input")
    link = out / "link.onnx"
    link.symlink_to(image)  # the same file by another name
    _error(capsys, 1, base + ["-o", str(link)], "would overwrite the input")
    link.unlink()
    assert main(base + ["-o", str(out / "m.onnx")]) == 0
    recipe = out / "m.recipe.json"
    again = [a for a in base if a not in ("--num-calib", "8")] + ["--recipe", str(recipe), "--format", "qdq"]
    made = _state(tmp)
    _error(capsys, 1, again + ["-o", str(out / "m.onnx")], "would overwrite the input")  # m.recipe.json
    _error(capsys, 1, ["eval", str(out / "m.onnx"), "--images", str(tmp / "calib"), "-q", "--json", str(image)],
           "would overwrite the input")
    _error(capsys, 1, ["eval", str(out / "m.onnx"), "--images", str(tmp / "calib"), "-q",
                       "--json", str(out / "m.onnx")], "would overwrite the input")
    assert _state(tmp) == made and all(_state(tmp)[p] == h for p, h in before.items())


def test_output_problems_are_found_before_any_work(work, capsys, monkeypatch):
    tmp, base, out = work
    monkeypatch.setattr(recipe_source, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking -o"))
    before = _state(tmp)
    _error(capsys, 1, base + ["-o", str(out)], "is a folder")
    (out / "m.recipe.json").mkdir()
    _error(capsys, 1, base + ["-o", str(out / "m.onnx")], "is a folder")  # the recipe's name is taken
    (out / "m.recipe.json").rmdir()
    _error(capsys, 1, base + ["-o", str(out / "nope" / "m.onnx")], "output folder does not exist")
    (out / "passes").write_text("a file")
    _error(capsys, 1, base + ["--save-passes", str(out / "passes"), "-o", str(out / "m.onnx")], "is a file")
    (out / "passes").unlink()
    assert _state(tmp) == before


def test_eval_mistakes_are_one_line_and_write_nothing(work, capsys):
    tmp, base, out = work
    assert main(base + ["-o", str(out / "m.onnx")]) == 0
    capsys.readouterr()
    before = _state(tmp)
    ev = ["eval", str(out / "m.onnx"), "--images", str(tmp / "calib"), "-q"]
    _error(capsys, 1, ev + ["--json", str(tmp / "missing" / "r.json")], "output folder does not exist")
    _error(capsys, 1, ev + ["--batch-size", "0"], "--batch-size must be at least 1")
    assert _state(tmp) == before


@pytest.mark.parametrize("args, match", [
    (["export", "--model", TINY, "-o", "x.onnx"], "required: --calib"),
    (["export", "--model", TINY, "--calib", "c", "-o", "x.onnx", "--format", "tflite"], "invalid choice"),
    (["export", "--model", TINY, "--calib", "c", "-o", "x.onnx", "--bogus"], "unrecognized arguments"),
    (["eval"], "required"),
    ([], "required"),
])
def test_usage_errors_exit_1_in_one_line(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _error(capsys, 1, args, match)
    assert list(tmp_path.iterdir()) == []


def test_weights_that_are_not_a_checkpoint(work, capsys):
    tmp, base, out = work
    for name, data, match in [("text.pth", b"hello, not a checkpoint", "not a torch checkpoint"),
                              ("zeros.pt", b"\x00" * 64, "not a torch checkpoint"),
                              ("junk.safetensors", b"\x00garbage" * 8, "not a safetensors file")]:
        bad = tmp / "in" / name
        bad.write_bytes(data)
        args = base.copy()
        args[args.index("--weights") + 1] = str(bad)
        _error(capsys, 1, args + ["-o", str(out / "m.onnx")], match)
    assert list(out.iterdir()) == []


def test_no_weights_and_no_cache_fails_at_once_without_the_network(tmp_path, tiny_calib_dir, capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network used: {a}"))
    _error(capsys, 1, ["export", "--model", "deit_t", "--calib", str(tiny_calib_dir), "-q",
                       "-o", str(tmp_path / "m.onnx")], "pass --weights FILE")


def test_useless_model_warns_and_strict_refuses(work, capsys, monkeypatch):
    tmp, base, out = work
    monkeypatch.setattr(validation, "LOW_FP_AGREEMENT", 1.01)  # the tiny model agrees 100 %: make that "low"
    assert main(base + ["-o", str(out / "m.onnx")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitq-onnx: warning:") and "agrees with the FP model" in err[0]
    meta = {p.key: json.loads(p.value) for p in onnx.load(out / "m.onnx").metadata_props}
    assert meta["vitq.validation"]["fp_top1_agreement"] == 1.0 and meta["vitq.validation"]["warnings"]
    before = _state(tmp)
    _error(capsys, 1, base + ["--strict", "-o", str(out / "n.onnx")], "--strict")
    assert _state(tmp) == before


def test_identical_exports_are_identical_bytes(work, capsys):
    tmp, base, out = work
    for run in ("a", "b"):
        (out / run).mkdir()
        assert main(base + ["--method", "repq-recon", "-o", str(out / run / "m.onnx")]) == 0
    assert "export_seconds" in json.loads(capsys.readouterr().out.splitlines()[-1])  # printed, not stored
    a, b = ({p.name: h for p, h in _state(out / run).items()} for run in ("a", "b"))
    assert sorted(a) == ["m.onnx", "m.recipe.json", "m.recipe.npz"] and a == b
    meta = {p.key: p.value for p in onnx.load(out / "a" / "m.onnx").metadata_props}
    assert "seconds" not in meta["vitq.validation"]


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_every_snapshot_has_shapes_and_metadata_and_evaluates(work, capsys, fmt):
    tmp, base, out = work
    labelled = tmp / "labelled"
    labelled.mkdir()
    for i, p in enumerate(sorted((tmp / "calib").iterdir())):  # synsets of classes 0..7
        synset = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
                  "n01514668"][i]
        (labelled / f"{synset}_{i}.png").write_bytes(p.read_bytes())
    assert main(base + ["--bits", "4/4", "--method", "repq", "--format", fmt, "--save-passes", str(out / "passes"),
                        "-o", str(out / "m.onnx")]) == 0
    snaps = sorted((out / "passes").iterdir())
    assert [s.name[:3] for s in snaps] == [f"{i:02d}_" for i in range(len(snaps))]
    assert snaps[0].name == "00_fp32.onnx" and snaps[-1].name.endswith("_check_model.onnx")
    for snap in snaps:
        model = onnx.load(snap)
        meta = {p.key for p in model.metadata_props}
        assert "vitq.preprocess" in meta and SHAPES_UNKNOWN not in meta, snap.name
        infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
        for node in model.graph.node:
            for name in filter(None, node.output):
                dims = infos[name].type.tensor_type.shape.dim  # KeyError: a tensor without a shape
                assert all(d.HasField("dim_value") or d.dim_param == "batch" or d.dim_param.endswith("*batch")
                           for d in dims), (snap.name, name, dims)
    capsys.readouterr()
    result = tmp / "last.json"
    assert main(["eval", str(snaps[-1]), "--images", str(labelled), "-q", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["images"] == 8


def test_stages_report_progress_off_a_terminal(work, capsys):
    tmp, base, out = work
    assert main([a for a in base if a != "-q"] + ["-o", str(out / "m.onnx")]) == 0
    err = capsys.readouterr().err
    for stage in ("channel-wise post-LayerNorm ranges", "weights (", "activations", "validation"):
        assert any(line.startswith("calibration: " + stage) or line.startswith(stage) and " in " in line
                   for line in err.splitlines()), (stage, err)
    assert "\r" not in err


def test_ctrl_c_stops_cleanly_and_leaves_nothing(work):
    tmp, base, out = work
    # Ctrl-C reaches a foreground export; a test suite started in the background of a shell inherits
    # SIGINT ignored, so the child restores Python's default handler, as a terminal would have it
    code = (f"import signal, sys; sys.path.insert(0, {str(ROOT)!r}); import tests.conftest; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from vitq_onnx.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [a for a in base if a != "-q"] + ["--method", "repq-recon", "-o", str(out / "m.onnx")]
    before = _state(tmp)
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "block reconstruction" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read().strip().splitlines()
    assert proc.wait(timeout=60) == 130, lines + rest
    assert rest and rest[-1] == "vitq-onnx: interrupted: no output written" and "Traceback" not in "".join(rest)
    assert _state(tmp) == before  # no output, no .vitq- temporary


def test_classify_example_errors_are_one_line(work, tiny_fp32_onnx, tmp_path):
    tmp, base, out = work
    assert main(base + ["-o", str(out / "m.onnx")]) == 0
    plain = tmp_path / "plain.onnx"
    onnx.save(tiny_fp32_onnx, plain)  # not exported by vitq-onnx: no preprocessing metadata
    image = next((tmp / "calib").iterdir())
    truncated = tmp_path / "cut.jpg"
    buf = tmp_path / "full.jpg"
    Image.open(image).convert("RGB").save(buf)
    truncated.write_bytes(buf.read_bytes()[:200])
    script = str(ROOT / "examples" / "classify.py")
    for args, match in [([str(plain), str(image)], "not exported by vitq-onnx"),
                        ([str(out / "m.onnx"), str(truncated)], "cannot read image"),
                        ([str(tmp_path / "none.onnx"), str(image)], "cannot load"),
                        ([str(out / "m.onnx"), str(image), "--labels", str(tmp_path / "none.txt")],
                         "cannot read labels")]:
        run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        err = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(err) == 1 and err[0].startswith("classify.py: error:") \
            and match in err[0], run.stderr
    ok = subprocess.run([sys.executable, script, str(out / "m.onnx"), str(image)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(str(image))
