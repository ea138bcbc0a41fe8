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


def test_min_side_decodes_a_large_jpeg_at_reduced_scale(tmp_path):
    photo = Image.open(IMAGES / "inf1.jpg").convert("RGB").resize((1224, 814))  # (W, H)
    jpeg = _save(photo, tmp_path / "big.jpg", quality=92)
    full, reduced = load_image(jpeg), load_image(jpeg, min_side=200)
    assert full.size == (1224, 814) and reduced.size == (306, 204)  # 1/4 scale: both sides still >= 200
    assert load_image(jpeg, min_side=400).size == (612, 407)  # 1/2 is the most that keeps >= 400
    assert load_image(jpeg, min_side=900).size == (1224, 814)  # too small to reduce
    png = _save(photo, tmp_path / "big.png")
    assert load_image(png, min_side=200).size == (1224, 814)  # only JPEG has DCT scaling
    mpo = _save(photo, tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[photo])
    assert Image.open(mpo).format == "MPO" and load_image(mpo, min_side=200).size == (306, 204)  # phone photos


def test_reduced_decode_gives_clip_the_same_pixels():
    import open_clip

    # a real 1300 x 1276 photo decoded at 1/4 scale keeps 2x the 150 px input; after CLIP's resize + crop the
    # two decodes differ by about a quarter of a grey level on average
    photo = IMAGES / "CONCEPTUAL_01.jpg"
    transform = open_clip.image_transform(150, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    reduced = load_image(photo, min_side=300)
    assert reduced.size == (325, 319)
    diff = (transform(load_image(photo)) - transform(reduced)).abs() * 255  # (3, 150, 150) in grey levels
    assert 0 < diff.mean() < 0.5 and diff.max() < 16


def test_min_side_keeps_orientation_and_the_pixel_limit(tmp_path):
    arr = np.zeros((400, 800, 3), np.uint8)
    arr[:, :400] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW: upright it is 400 x 800, red on top
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(path, min_side=100)
    assert img.size == (100, 200) and np.asarray(img)[10, 50][0] > 200
    with pytest.raises(BadImageError) as err:
        load_image(path, max_pixels=800 * 400 - 1, min_side=100)  # checked on the full size, before decoding
    assert err.value.reason == "too large"
