"""Fast tier: Hugging Face transformers vision towers (--model hf:DIR and the Python API on the
module), built from random configs as save_pretrained writes them: each exports bit-exact with its
attention quantized and RepQ-ViT's fold on its blocks; preprocessing follows the folder."""

import json

import numpy as np
import pytest
from PIL import Image

from vitq_onnx import api, cli
from vitq_onnx.errors import VitqError
from vitq_onnx.recipe import Recipe

T = pytest.importorskip("transformers")

# name -> (config, class, image processor): 2 blocks, width 32, 32-px images, 8-px patches
TOWERS = {
    "vit": lambda: (T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8, num_labels=10),
                    T.ViTForImageClassification, T.ViTImageProcessor(size={"height": 32, "width": 32})),
    "dinov2": lambda: (T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                      image_size=32, patch_size=8),
                       T.Dinov2Model, T.BitImageProcessor(size={"shortest_edge": 36},
                                                          crop_size={"height": 32, "width": 32})),
    "clip": lambda: (T.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8),
                     T.CLIPVisionModel, T.CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32})),
    "siglip": lambda: (T.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=8),
                       T.SiglipVisionModel, T.SiglipImageProcessor(size={"height": 32, "width": 32})),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("hf")
    for name, make in TOWERS.items():
        config, cls, processor = make()
        torch.manual_seed(0)
        cls(config).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


def _export(args, capsys):
    code = cli.main(["export", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


@pytest.mark.parametrize("name, bits, fmt", [("vit", "8/8", "ort"), ("dinov2", "4/4", "ort"),
                                             ("clip", "4/4", "qdq"), ("siglip", "4/4", "ort")])
def test_a_tower_exports_bit_exact_with_its_attention_quantized(towers, tiny_calib_dir, tmp_path, capsys, name, bits,
                                                                fmt):
    out = tmp_path / "m.onnx"
    report = _export(["--model", f"hf:{towers / name}", "--bits", bits, "--method", "repq", "--format", fmt, "--calib",
                      str(tiny_calib_dir), "--num-calib", "8", "-o", str(out)], capsys)
    assert report["exact_images"] == 1.0
    recipe = Recipe.load(out.with_suffix(".recipe.json"))
    heads = 1 if name == "siglip" else 0  # SigLIP's attention-pooling head
    assert sum("/matmul_" in k for k in recipe.activations) == 4 * (2 + heads)
    assert all(len(r.linears) == 3 for r in recipe.reparams if "norm" in r.norm and "q_proj" in r.linears[0])
    assert len(recipe.reparams) == 4 + heads  # per block: the norm before q/k/v, the norm before fc1
    assert recipe.model == f"hf:{name}/{json.loads((towers / name / 'config.json').read_text())['architectures'][0]}"


def test_reconstruction_trains_a_towers_layers(towers, tiny_calib_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    report = _export(["--model", f"hf:{towers / 'vit'}", "--bits", "4/4", "--method", "repq-recon", "--calib",
                      str(tiny_calib_dir), "--num-calib", "8", "--time-budget", "0.15", "-o", str(out)], capsys)
    assert report["exact_images"] == 1.0
    recon = Recipe.load(out.with_suffix(".recipe.json")).info["reconstruction"]
    assert recon["units"] == ["tower.vit.layers.0", "tower.vit.layers.1"] and min(recon["iters"]) >= 1


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_preprocessing_follows_the_folder(towers, name):
    from vitq_onnx.hf_models import load

    model = load(f"hf:{towers / name}")
    processor = T.AutoImageProcessor.from_pretrained(towers / name)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).resize((90, 60), Image.BILINEAR)
    ours = model.vitq_preprocess(img)
    theirs = processor(images=img, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    # resize kernels differ slightly between PIL and transformers' backend: same geometry, close values
    assert np.abs(ours - theirs).mean() < 0.05


def test_the_api_takes_the_module(towers, tiny_calib_dir, tmp_path):
    tower = T.ViTForImageClassification.from_pretrained(towers / "vit")
    exported = api.export(tower, "8/8", tiny_calib_dir, output=tmp_path / "m.onnx", num_calib=8, progress=False)
    assert exported.report["exact_images"] == 1.0
    assert not hasattr(tower.vit.layers[0].attention, "vq_attend")  # the caller's module is left as it was
    with pytest.raises(VitqError, match="preprocessor_config.json"):
        api.export(T.ViTForImageClassification(TOWERS["vit"]()[0]), "8/8", tiny_calib_dir, output=tmp_path / "n.onnx")


def test_bad_folders_get_one_line(towers, tmp_path, tiny_calib_dir, capsys):
    config = json.loads((towers / "vit" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "architectures": ["BeitModel"]}))
    for model, message in [(f"hf:{tmp_path / 'none'}", "no config.json"),
                           (f"hf:{tmp_path / 'other'}", "BeitModel is not supported")]:
        code = cli.main(["export", "--model", model, "--calib", str(tiny_calib_dir), "-o", str(tmp_path / "x.onnx")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and err[-1].startswith("vitq-onnx: error:") and message in err[-1]
    assert not (tmp_path / "x.onnx").exists()


def test_preprocessor_configs_as_older_files_write_them(towers, tmp_path):
    from vitq_onnx.hf_models import preprocess_of

    config = T.ViTConfig(image_size=32)
    for cfg, want in [({"size": 40, "do_center_crop": True, "crop_size": 32, "resample": 3}, (32, "short_side", 40)),
                      ({"size": 32, "resample": 2}, (32, "square", 32))]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
        pre = preprocess_of(tmp_path, config)
        side = int(pre.size / pre.crop_pct) if pre.resize == "short_side" else pre.size
        assert (pre.size, pre.resize, side) == want
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(VitqError, match="not readable JSON"):
        preprocess_of(tmp_path, config)
