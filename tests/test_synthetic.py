"""The synthetic food scenes: deterministic, captions follow from what is drawn, a held-out split of every kind."""
from __future__ import annotations

import csv
import hashlib

import pytest
from PIL import Image

from foodcap.synthetic import CONTAINERS, FOODS, draw_scene, make_synthetic_dataset, scene_captions


def test_dataset_layout_and_held_out_split(tmp_path):
    ds = make_synthetic_dataset(tmp_path, per_combo=3, test_per_combo=1, foods=["tomato", "lime"],
                                containers=["plate", "bowl"], counts=(1, 3))
    assert len(ds.scenes) == 2 * 2 * 2 * 3
    assert len(ds.split("test")) == 8 and len(ds.split("train")) == 16
    kinds = lambda split: {(s.food, s.container, s.count) for s in ds.split(split)}  # noqa: E731
    assert kinds("test") == kinds("train")  # every kind is learnable and tested on unseen pictures
    with ds.captions_file.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(s.captions) for s in ds.scenes)
    for row in rows:
        assert (tmp_path / row["file_name"]).is_file()
        food, container, count, _ = row["image_id"].split("_")
        assert container in row["caption"]
        assert FOODS[food][0 if count == "1" else 1] in row["caption"]


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", per_combo=2, test_per_combo=1, foods=["plum"], containers=["board"])
    b = make_synthetic_dataset(tmp_path / "b", per_combo=2, test_per_combo=1, foods=["plum"], containers=["board"])
    digest = lambda ds: [hashlib.sha256((ds.root / s.file_name).read_bytes()).hexdigest() for s in ds.scenes]  # noqa: E731
    assert digest(a) == digest(b)
    assert len(set(digest(a))) == len(a.scenes)  # pictures of one kind still differ


@pytest.mark.parametrize("food", sorted(f for f in FOODS if FOODS[f][4] != "long"))
def test_single_item_is_drawn_in_its_colour(food):
    # one piece sits at the centre of the picture: its pixel must be the food's colour, whatever the container
    for container in CONTAINERS:
        img = draw_scene(food, container, 1, size=128, seed=7)
        pixel = img.getpixel((64, 64))
        assert max(abs(a - b) for a, b in zip(pixel, FOODS[food][3])) <= 30, (food, container, pixel)


def test_captions_name_count_and_container(tmp_path):
    assert scene_captions("tomato", "bowl", 1)[0] == "a tomato in a bowl"
    assert scene_captions("lime", "plate", 3)[1] == "a plate with three green limes"
    with pytest.raises(ValueError, match="unknown"):
        make_synthetic_dataset(tmp_path, foods=["pizza"])


def test_image_is_rgb_of_requested_size():
    img = draw_scene("banana", "plate", 2, size=96, seed=1)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (96, 96)
