"""The synthetic food scenes: deterministic, captions follow from what is drawn, held-out splits of every kind."""
from __future__ import annotations

import csv
import hashlib

import pytest
from PIL import Image

from foodcap.synthetic import CONTAINERS, FOODS, draw_scene, make_synthetic_dataset, scene_captions


def test_dataset_layout_and_held_out_splits(tmp_path):
    ds = make_synthetic_dataset(tmp_path, per_combo=5, test_per_combo=2, val_per_combo=1, foods=["tomato", "lime"],
                                containers=["plate", "bowl"])
    assert len(ds.scenes) == 2 * 2 * 5
    assert (len(ds.split("train")), len(ds.split("val")), len(ds.split("test"))) == (8, 4, 8)
    kinds = lambda split: {(s.food, s.container) for s in ds.split(split)}  # noqa: E731
    assert kinds("test") == kinds("val") == kinds("train")  # every kind is learnt and tested on unseen pictures
    assert {s.count for s in ds.split("test")} == {2, 3}
    with ds.captions_file.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(s.captions) for s in ds.scenes)
    for row in rows:
        assert (tmp_path / row["file_name"]).is_file()
        food, container, _ = row["image_id"].split("_")
        assert container in row["caption"] and FOODS[food][1] in row["caption"]  # plural: 2-3 pieces are drawn
    with pytest.raises(ValueError, match="must leave training images"):
        make_synthetic_dataset(tmp_path, per_combo=3, test_per_combo=2, val_per_combo=1)


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", per_combo=3, test_per_combo=1, val_per_combo=1, foods=["plum"], containers=["board"])
    b = make_synthetic_dataset(tmp_path / "b", per_combo=3, test_per_combo=1, val_per_combo=1, foods=["plum"], containers=["board"])
    digest = lambda ds: [hashlib.sha256((ds.root / s.file_name).read_bytes()).hexdigest() for s in ds.scenes]  # noqa: E731
    assert digest(a) == digest(b)
    assert len(set(digest(a))) == len(a.scenes)  # pictures of one kind still differ


def _median(band: Image.Image) -> int:
    counts, seen = band.histogram(), 0
    for value, n in enumerate(counts):
        seen += n
        if seen * 2 >= sum(counts):
            return value
    return 255


@pytest.mark.parametrize("food", sorted(f for f in FOODS if FOODS[f][4] != "long"))
def test_single_item_is_drawn_in_its_colour(food):
    # one piece sits at the centre of the picture: the centre's median colour is the food's, whatever the container
    for container in CONTAINERS:
        img = draw_scene(food, container, 1, size=128, seed=7).crop((54, 54, 74, 74))
        pixel = [_median(band) for band in img.split()]  # per channel, over the 20 x 20 pixels
        assert max(abs(a - b) for a, b in zip(pixel, FOODS[food][3])) <= 30, (food, container, pixel)


def test_container_colour_shows_around_the_food():
    # the most common non-table colour of a picture is the food's or the container's, never anything else
    for container in CONTAINERS:
        img = draw_scene("lime", container, 2, size=96, seed=3)
        colours = sorted(img.getcolors(96 * 96), reverse=True)[:40]
        fill = CONTAINERS[container][3]
        assert any(max(abs(a - b) for a, b in zip(rgb, fill)) <= 16 for _, rgb in colours), container


def test_captions_name_food_and_container(tmp_path):
    assert scene_captions("tomato", "bowl", 3) == ["tomatoes in a bowl", "a bowl with red tomatoes",
                                                   "a blue bowl with tomatoes"]
    assert scene_captions("lime", "plate", 1)[0] == "a lime on a plate"
    with pytest.raises(ValueError, match="unknown"):
        make_synthetic_dataset(tmp_path, foods=["pizza"])


def test_image_is_rgb_of_requested_size():
    img = draw_scene("banana", "plate", 2, size=96, seed=1)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (96, 96)
