"""Bad input: one clear line on stderr, exit 1, no output file, inputs untouched."""

import hashlib
import json

import onnx
import pytest
import torch

from vitq_onnx.cli import main

from .conftest import CALIB, DEIT_WEIGHTS

pytestmark = pytest.mark.slow


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails(args, capsys, match):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("vitq-onnx: error:"), err
    assert match in err[-1], err[-1]


@pytest.fixture
def base(tmp_path, deit):
    return ["export", "--model", "deit_t", "--weights", str(DEIT_WEIGHTS), "--calib", str(CALIB), "-q"]


@pytest.mark.parametrize("bits", ["4", "9/8", "8/1", "a/b", "8/8/8", "-4/4"])
def test_bad_bits(base, bits, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    _fails(base + [f"--bits={bits}", "-o", str(out)], capsys, "bad --bits")
    assert not out.exists()


def test_unknown_model(base, tmp_path, capsys):
    args = base + ["-o", str(tmp_path / "m.onnx")]
    args[args.index("deit_t")] = "resnet_nonexistent"
    _fails(args, capsys, "unknown model 'resnet_nonexistent'")


def test_missing_empty_and_broken_calibration_folders(base, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = base + ["-o", str(out)]
    calib_at = args.index(str(CALIB))
    for folder, match in [(tmp_path / "nope", "image folder not found"), (tmp_path / "empty", "no images"),
                          (tmp_path / "text", "no images"), (tmp_path / "broken", "could be read")]:
        if folder.name != "nope":
            folder.mkdir()
        if folder.name == "text":
            (folder / "notes.txt").write_text("hello")
        if folder.name == "broken":
            (folder / "a.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        args[calib_at] = str(folder)
        _fails(args, capsys, match)
    assert not out.exists()


def test_bad_weights(base, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = base + ["-o", str(out)]
    at = args.index(str(DEIT_WEIGHTS))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    pickled = tmp_path / "corrupt.pth"
    pickled.write_bytes(b"not a zip or pickle")
    for weights, match in [(tmp_path / "missing.pth", "not found"), (corrupt, "cannot read weights"),
                           (pickled, "cannot read weights")]:
        args[at] = str(weights)
        _fails(args, capsys, match)
    args[at] = str(DEIT_WEIGHTS)
    args[args.index("deit_t")] = "vit_s"  # DeiT-Ti weights for a ViT-S
    _fails(args, capsys, "do not fit vit_small_patch16_224")
    assert not out.exists()


def test_bad_output_paths_and_inputs_untouched(base, tmp_path, capsys):
    before = _sha(DEIT_WEIGHTS)
    _fails(base + ["-o", str(tmp_path / "missing" / "m.onnx")], capsys, "output folder does not exist")
    _fails(base + ["-o", "/proc/m.onnx"], capsys, "cannot write")
    _fails(base + ["-o", str(DEIT_WEIGHTS)], capsys, "would overwrite the input")
    assert _sha(DEIT_WEIGHTS) == before


def test_weights_found_in_the_hub_cache_without_the_network(deit, tmp_path, monkeypatch):
    """A Hugging Face cache holding timm's DeiT-Ti checkpoint is used as is, offline or not."""
    import socket

    from huggingface_hub import constants

    from vitq_onnx.models import create_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network used: {a}"))
    repo = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").symlink_to(DEIT_WEIGHTS)
    model = create_model("deit_t")
    assert all(torch.equal(v, deit.state_dict()[k]) for k, v in model.state_dict().items())


def test_w2a2_is_called_useless_and_strict_refuses_it(base, tmp_path, capsys):
    out = tmp_path / "w2a2.onnx"
    assert main(base + ["--bits", "2/2", "--method", "repq", "-o", str(out)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitq-onnx: warning:")]
    assert len(warning) == 1 and "agrees with the FP model on only" in warning[0]
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert meta["vitq.validation"]["fp_top1_agreement"] < 0.5 and meta["vitq.validation"]["warnings"]
    strict = base + ["--recipe", str(tmp_path / "w2a2.recipe.json"), "--strict", "-o", str(tmp_path / "again.onnx")]
    _fails(strict, capsys, "--strict")
    assert not (tmp_path / "again.onnx").exists()
