import numpy as np
import pytest
from PIL import Image

from vitq_onnx.errors import VitqError
from vitq_onnx.images import label_of, list_images, load_images, load_synsets

from .conftest import CALIB, VAL

pytestmark = pytest.mark.slow


def test_numpy_preprocess_equals_timm_transform(deit, preprocess):
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=deit))
    for path in list_images(VAL)[:4]:
        with Image.open(path) as img:
            ours = preprocess(img)
            theirs = transform(img.convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, 224, 224)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_labels_from_file_names_and_folders(tmp_path):
    synsets = load_synsets()
    assert len(synsets) == 1000 and synsets["n01440764"] == 0 and synsets["n15075141"] == 999
    path = next(p for p in list_images(VAL) if p.name.startswith("n01443537"))
    assert label_of(path, VAL, synsets) == 1
    (tmp_path / "n01484850").mkdir()
    folder_img = tmp_path / "n01484850" / "x.jpg"
    assert label_of(folder_img, tmp_path, synsets) == 2
    with pytest.raises(VitqError, match="cannot tell the class"):
        label_of(tmp_path / "cat.jpg", tmp_path, synsets)


def test_corrupt_image_is_skipped_with_warning(tmp_path, preprocess, capsys):
    good = list_images(CALIB)[0]
    (tmp_path / "a.JPEG").write_bytes(good.read_bytes())
    (tmp_path / "b.JPEG").write_bytes(good.read_bytes()[:200])  # truncated JPEG
    images, kept = load_images(list_images(tmp_path), preprocess)
    assert images.shape == (1, 3, 224, 224) and [p.name for p in kept] == ["a.JPEG"]
    assert "skipping unreadable image" in capsys.readouterr().err


def test_no_usable_images_is_an_error(tmp_path, preprocess):
    with pytest.raises(VitqError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VitqError, match="could be read"):
        load_images(list_images(tmp_path), preprocess)
