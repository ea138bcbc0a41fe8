"""A synthetic food-scene dataset whose captions follow from what is drawn (for the offline demo and tests).

Each picture is a white plate, a blue bowl or a wooden board holding a few pieces of one food on a grey
table; the captions name that food and container: "tomatoes in a bowl", "a white plate with limes", ...
Foods and containers differ mainly in colour and the food covers much of the picture, so even a
randomly initialised CLIP encoder's features tell them apart, and a captioner trained on them must read
the image to beat a constant caption. The number of pieces varies but is not captioned: tiny random
encoders cannot count.

    python -c "from foodcap.synthetic import make_synthetic_dataset as m; print(m('synthetic_food').summary())"
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFilter

from .utils import write_atomic

log = logging.getLogger(__name__)

# food -> (singular, plural, colour word, RGB, shape)
FOODS = {
    "tomato": ("tomato", "tomatoes", "red", (205, 30, 25), "round"),
    "orange": ("orange", "oranges", "orange", (250, 140, 10), "round"),
    "lime": ("lime", "limes", "green", (60, 170, 40), "round"),
    "banana": ("banana", "bananas", "yellow", (245, 220, 40), "long"),
    "cookie": ("cookie", "cookies", "brown", (130, 80, 35), "flat"),
    "plum": ("plum", "plums", "purple", (150, 30, 120), "round"),
}
# container -> (noun, preposition, adjective, fill RGB, rim RGB)
CONTAINERS = {
    "plate": ("plate", "on", "white", (245, 245, 240), (205, 205, 200)),
    "bowl": ("bowl", "in", "blue", (40, 90, 200), (20, 50, 140)),
    "board": ("board", "on", "wooden", (190, 140, 80), (140, 95, 50)),
}
TABLE_COLOURS = [(120, 120, 125), (108, 110, 118), (132, 128, 124)]  # muted greys, never a food colour
CAPTIONS_FILE = "captions.csv"
ITEM_SCALE = 0.2  # pieces of food are big: their colour must dominate even a 64 px random encoder


@dataclass
class SyntheticScene:
    image_id: str
    file_name: str  # relative to the dataset root
    food: str
    container: str
    count: int
    split: str  # "train" | "val" | "test"
    captions: list[str] = field(default_factory=list)


@dataclass
class SyntheticDataset:
    root: Path
    scenes: list[SyntheticScene]

    @property
    def captions_file(self) -> Path:
        return self.root / CAPTIONS_FILE

    def split(self, name: str) -> list[SyntheticScene]:
        return [s for s in self.scenes if s.split == name]

    def summary(self) -> str:
        n_caps = sum(len(s.captions) for s in self.scenes)
        parts = ", ".join(f"{len(self.split(name))} {name}" for name in ("train", "val", "test"))
        return f"{len(self.scenes)} synthetic images ({parts}), {n_caps} captions in {self.root}"


def scene_captions(food: str, container: str, count: int) -> list[str]:
    """The reference captions of a scene: three phrasings of its food and container."""
    singular, plural, colour, _, _ = FOODS[food]
    noun, prep, adjective, _, _ = CONTAINERS[container]
    name = f"a {singular}" if count == 1 else plural
    return [
        f"{name} {prep} a {noun}",
        f"a {noun} with {colour} {plural if count > 1 else singular}" if count > 1 else f"a {noun} with a {colour} {singular}",
        f"a {adjective} {noun} with {name}",
    ]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_item(draw: ImageDraw.ImageDraw, food: str, cx: float, cy: float, r: float, rng: random.Random) -> None:
    _, _, _, rgb, shape = FOODS[food]
    fill = _jitter(rgb, rng)
    dark = tuple(int(c * 0.6) for c in fill)
    if shape == "long":  # a banana: a thick arc
        box = (cx - r * 1.4, cy - r * 1.0, cx + r * 1.4, cy + r * 1.8)
        draw.arc(box, start=195, end=345, fill=fill, width=max(3, int(r * 0.9)))
        return
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=dark, width=max(1, int(r * 0.08)))
    if shape == "flat":  # a cookie: chocolate chips
        for _ in range(4):
            ox, oy = rng.uniform(-0.5, 0.5) * r, rng.uniform(-0.5, 0.5) * r
            draw.ellipse((cx + ox - r * 0.12, cy + oy - r * 0.12, cx + ox + r * 0.12, cy + oy + r * 0.12), fill=(60, 35, 20))
    else:  # a highlight and a stalk make it look like fruit
        draw.ellipse((cx - r * 0.5, cy - r * 0.55, cx - r * 0.15, cy - r * 0.2), fill=_jitter((255, 255, 255), rng, 20))
        draw.line((cx, cy - r, cx + r * 0.15, cy - r * 1.25), fill=(70, 110, 30), width=max(1, int(r * 0.12)))


def draw_scene(food: str, container: str, count: int, *, size: int = 128, seed: int = 0) -> Image.Image:
    """Draw one scene (RGB, size x size): table, container, `count` pieces of `food`."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), _jitter(rng.choice(TABLE_COLOURS), rng, 8))
    draw = ImageDraw.Draw(img)
    _, _, _, fill, rim = CONTAINERS[container]
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.05, 0.05) * size
    half = size * rng.uniform(0.40, 0.46)
    if container == "board":
        draw.rounded_rectangle((cx - half, cy - half * 0.8, cx + half, cy + half * 0.8), radius=size * 0.05,
                               fill=_jitter(fill, rng), outline=rim, width=max(2, size // 40))
    else:
        rim_w = max(2, int(size * (0.03 if container == "plate" else 0.07)))
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=_jitter(fill, rng), outline=rim, width=rim_w)
    r = size * ITEM_SCALE * (3 / count) ** 0.4  # fewer pieces are drawn bigger: food colour always dominates
    slots = [(0.0, 0.0)] if count == 1 else [(-0.5, 0.0), (0.5, 0.0)] if count == 2 else [(-0.5, 0.35), (0.5, 0.35), (0.0, -0.5)]
    angle = rng.uniform(0, 2 * math.pi)
    for sx, sy in slots:
        x = sx * math.cos(angle) - sy * math.sin(angle)
        y = sx * math.sin(angle) + sy * math.cos(angle)
        _draw_item(draw, food, cx + x * half * 0.95, cy + y * half * 0.95, r * rng.uniform(0.9, 1.1), rng)
    return img.filter(ImageFilter.GaussianBlur(radius=size / 256))


def make_synthetic_dataset(out_dir: str | os.PathLike, *, per_combo: int = 20, test_per_combo: int = 4,
                           val_per_combo: int = 2, size: int = 128, seed: int = 0, foods: Optional[list[str]] = None,
                           containers: Optional[list[str]] = None, counts: tuple[int, ...] = (2, 3)) -> SyntheticDataset:
    """Draw `per_combo` images of every (food, container); hold `test_per_combo` + `val_per_combo` of each out.

    The pieces of food per image cycle through `counts`. Writes `out_dir/images/*.png` and
    `out_dir/captions.csv` (file_name, caption, split, image_id: one row per caption). Deterministic for a seed.
    """
    if test_per_combo < 0 or val_per_combo < 0 or test_per_combo + val_per_combo >= per_combo:
        raise ValueError(f"test_per_combo ({test_per_combo}) + val_per_combo ({val_per_combo}) must leave training "
                         f"images out of per_combo={per_combo}")
    foods = foods or list(FOODS)
    containers = containers or list(CONTAINERS)
    unknown = sorted(set(foods) - set(FOODS)) + sorted(set(containers) - set(CONTAINERS))
    if unknown:
        raise ValueError(f"unknown foods/containers {unknown}; choose from {sorted(FOODS)} and {sorted(CONTAINERS)}")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    scenes: list[SyntheticScene] = []
    for combo, (food, container) in enumerate(itertools.product(foods, containers)):
        for k in range(per_combo):
            count = counts[k % len(counts)]
            image_id = f"{food}_{container}_{k:03d}"
            file_name = f"images/{image_id}.png"
            buf = io.BytesIO()
            draw_scene(food, container, count, size=size, seed=seed * 1_000_003 + combo * 1009 + k).save(buf, "PNG")
            write_atomic(root / file_name, buf.getvalue())
            split = "test" if k < test_per_combo else "val" if k < test_per_combo + val_per_combo else "train"
            scenes.append(SyntheticScene(image_id, file_name, food, container, count, split,
                                         scene_captions(food, container, count)))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["file_name", "caption", "split", "image_id"])
    for s in scenes:
        writer.writerows([s.file_name, c, s.split, s.image_id] for c in s.captions)
    write_atomic(root / CAPTIONS_FILE, rows.getvalue())
    dataset = SyntheticDataset(root, scenes)
    log.info("%s", dataset.summary())
    return dataset
