"""load_image: orientation, mode conversion, and each kind of bad file.  pytest -q tests/test_images.py"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from foodcap.images import BadImageError, load_image, to_rgb

from conftest import IMAGES


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_real_photo_loads_as_rgb():
    img = load_image(IMAGES / "inf1.jpg")
    assert img.mode == "RGB"
    assert img.size == Image.open(IMAGES / "inf1.jpg").size


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 image, left half red, tagged "rotate 90 CW" (orientation 6): shown upright it is 20x40.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[2, 10], np.asarray(img)[-3, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is on top after rotating 90 degrees clockwise
    assert bottom[0] < 60


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16", "1"])
def test_modes_convert_to_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    img = base.convert("L").convert(mode) if mode in ("I;16", "1") else base.convert(mode)
    suffix = ".tif" if mode in ("CMYK", "I;16") else ".png"
    out = load_image(_save(img, tmp_path / f"x{suffix}"))
    assert out.mode == "RGB" and out.size == (24, 16)


def test_16bit_gray_keeps_its_range():
    gray16 = Image.fromarray((np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16))
    assert gray16.mode.startswith("I;16")
    out = np.asarray(to_rgb(gray16))
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155  # not clipped to white


def test_alpha_composites_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 200, 30, 255))
    out = load_image(_save(rgba, tmp_path / "a.png"))
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (10, 200, 30)
    pal = rgba.convert("P")
    pal.info["transparency"] = pal.getpixel((5, 5))
    assert load_image(_save(pal, tmp_path / "p.png", transparency=pal.getpixel((5, 5)))).getpixel((5, 5)) == (255, 255, 255)


def test_bytes_and_streams(tmp_path):
    data = (IMAGES / "scone.jpg").read_bytes()
    assert load_image(data).size == load_image(io.BytesIO(data)).size == load_image(IMAGES / "scone.jpg").size


def _bad_files(tmp_path):
    good = (IMAGES / "scone.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is a caption, not a photo")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "cut_header.jpg").write_bytes(good[:300])  # cut inside the JPEG header tables
    # A PNG of 10000 x 10000 pixels (over the limit, under Pillow's own bomb error): refused before any pixel is decoded.
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb.png")
    return {"missing": tmp_path / "nope.jpg", "empty": tmp_path / "empty.jpg",
            "not an image": tmp_path / "text.jpg", "truncated": tmp_path / "cut.jpg",
            "truncated ": tmp_path / "cut_header.jpg",
            "too large": tmp_path / "bomb.png"}


def test_each_bad_file_kind_has_its_reason(tmp_path):
    for reason, path in _bad_files(tmp_path).items():
        with pytest.raises(BadImageError) as info:
            load_image(path)
        assert info.value.reason == reason.strip(), (path, info.value)
        assert info.value.path == str(path) and str(path) in str(info.value)
    with pytest.raises(BadImageError) as info:
        load_image(tmp_path)
    assert info.value.reason == "not an image"
