"""Caption readers, token limit and the split by image.  pytest -q tests/test_datasets.py"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from foodcap.datasets import DatasetError, clean_caption, read_dataset
from foodcap.extraction import count_tokens, plan_extraction, split_images

from conftest import FOOD_CAPTIONS, IMAGES

PHOTOS = sorted(p for p in IMAGES.glob("*.jpg"))


def make_photos(folder: Path, names, size: int = 48) -> list[Path]:
    """Small copies of the bundled real photos under the given names (fast to decode in tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        img = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        img.thumbnail((size, size))
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        out.append(path)
    return out


def test_real_food_captions_parse_to_1996_non_empty():
    data = read_dataset(FOOD_CAPTIONS)
    assert data.format == "kaggle"
    assert len(data.records) == 1996 and data.counts == {"rows": 2000, "empty": 4}
    assert all(r.caption and r.caption == " ".join(r.caption.split()) for r in data.records)
    first = data.records[0]
    assert first.image_id == 0 and first.caption == "Chicken curry with rice on plate"
    assert Path(first.image_path).name == "0.jpg"
    multi_line = [r for r in data.records if r.image_id == 662][0]  # a quoted caption spanning lines
    assert "\n" not in multi_line.caption and multi_line.caption.startswith("Food waste problem")


@pytest.mark.parametrize("sub", ["", "images", "dataset"])
def test_kaggle_layout_finds_images_beside_or_in_subfolder(tmp_path, sub):
    root = tmp_path / "food"
    root.mkdir()
    with open(root / "Captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Index", "Captions"])
        w.writerows([[0, 0, "Soup"], [1, 1, ""], [2, 2, "Pasta\nwith  cheese"], [3, 3, "Cake"]])
    make_photos(root / sub, ["0.jpg", "1.jpg", "2.jpg", "3.png"])
    for path in (root, root / "Captions.csv"):  # --data_path: the folder or the file
        data = read_dataset(path)
        assert data.image_dir == root / sub
        assert [(r.image_id, r.caption) for r in data.records] == [(0, "Soup"), (2, "Pasta with cheese"), (3, "Cake")]
        assert all(Path(r.image_path).is_file() for r in data.records)  # 3.png found for {Index}.jpg


def test_table_csv_tsv_jsonl(tmp_path):
    make_photos(tmp_path / "pics", ["a.jpg", "b.jpg"])
    rows = [{"photo": "a.jpg", "desc": "one"}, {"photo": "b.jpg", "desc": "two"}, {"photo": "", "desc": "lost"},
            {"photo": "a.jpg", "desc": "three"}]
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["photo", "desc"])
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "c.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, ["photo", "desc"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c.csv", "c.tsv", "c.jsonl"):
        with pytest.raises(DatasetError, match="--image_column"):
            read_dataset(tmp_path / name)
        data = read_dataset(tmp_path / name, image_column="photo", caption_column="desc")
        assert data.format == "table" and data.image_dir == tmp_path / "pics"
        assert [(Path(r.image_path).name, r.caption) for r in data.records] == [("a.jpg", "one"), ("b.jpg", "two"),
                                                                                ("a.jpg", "three")]
        assert data.counts["no_image"] == 1
    with pytest.raises(DatasetError, match="no column 'nope'"):
        read_dataset(tmp_path / "c.csv", image_column="nope", caption_column="desc")


def test_bundled_captions_csv_guesses_columns():
    data = read_dataset(IMAGES / "captions.csv")
    assert data.format == "table" and len(data.records) == 25
    assert all(Path(r.image_path).is_file() for r in data.records)


def test_coco_json(tmp_path):
    make_photos(tmp_path / "val2014", ["COCO_1.jpg", "COCO_2.jpg"])
    coco = {"images": [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "A dog. "}, {"id": 11, "image_id": 2, "caption": "A cat"},
                            {"id": 12, "image_id": 1, "caption": "A brown dog"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    data = read_dataset(tmp_path / "captions_val2014.json")
    assert data.format == "coco" and data.image_dir == tmp_path / "val2014"
    assert [(r.image_id, r.caption) for r in data.records] == [(1, "A dog."), (2, "A cat"), (1, "A brown dog")]
    coco["annotations"].append({"id": 13, "image_id": 99, "caption": "ghost"})  # no such image: skipped, counted
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    data = read_dataset(tmp_path / "bad.json")
    assert len(data.records) == 3 and data.counts["no_image"] == 1


def test_karpathy_json_keeps_its_split(tmp_path):
    make_photos(tmp_path / "val2014", ["x.jpg", "y.jpg", "z.jpg"])
    images = [{"filepath": "val2014", "filename": f, "cocoid": i, "split": s,
               "sentences": [{"raw": f"caption {j} of {f}"} for j in range(2)]}
              for i, (f, s) in enumerate([("x.jpg", "train"), ("y.jpg", "restval"), ("z.jpg", "test")])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    data = read_dataset(tmp_path)
    assert data.format == "karpathy" and len(data.records) == 6
    assert all(Path(r.image_path).is_file() for r in data.records)
    assert [r.split for r in data.records[::2]] == ["train", "train", "test"]
    plan = plan_extraction(data.records, test_size=0.5)  # the dataset's own split wins
    assert plan.image_splits == ["train", "train", "test"]


def test_hf_imagefolder_with_split_folders(tmp_path):
    make_photos(tmp_path / "train", ["a.jpg", "b.jpg"])
    make_photos(tmp_path / "test", ["c.jpg"])
    (tmp_path / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "text": "soup"}) + "\n" + json.dumps({"file_name": "b.jpg", "text": "pie"}) + "\n")
    with open(tmp_path / "test" / "metadata.csv", "w", newline="") as f:
        f.write("file_name,text\nc.jpg,salad\n")
    data = read_dataset(tmp_path)
    assert data.format == "imagefolder"
    assert [(r.caption, r.split) for r in data.records] == [("soup", "train"), ("pie", "train"), ("salad", "test")]
    assert all(Path(r.image_path).is_file() for r in data.records)
    flat = tmp_path / "flat"
    make_photos(flat, ["d.jpg"])
    (flat / "metadata.jsonl").write_text(json.dumps({"file_name": "d.jpg", "text": "bread"}) + "\n")
    assert [(r.caption, r.split) for r in read_dataset(flat / "metadata.jsonl").records] == [("bread", None)]


def test_folder_of_images_with_txt_captions(tmp_path):
    make_photos(tmp_path, ["one.jpg", "two.png", "three.jpg"])
    (tmp_path / "one.txt").write_text("a bowl of soup\n\nsoup in a bowl\n")
    (tmp_path / "two.txt").write_text("muffins")
    data = read_dataset(tmp_path)  # three.jpg has no caption file: not a record
    assert data.format == "txt"
    assert sorted((Path(r.image_path).name, r.caption) for r in data.records) == [
        ("one.jpg", "a bowl of soup"), ("one.jpg", "soup in a bowl"), ("two.png", "muffins")]
    assert data.counts["empty"] == 1


def test_unknown_inputs_have_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such caption file"):
        read_dataset(tmp_path / "missing.csv")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DatasetError, match="neither COCO"):
        read_dataset(tmp_path / "x.json")
    (tmp_path / "y.xml").write_text("<a/>")
    with pytest.raises(DatasetError, match="--format"):
        read_dataset(tmp_path / "y.xml")


def test_clean_caption():
    assert clean_caption("  a\n b\t c ") == "a b c"
    assert clean_caption(float("nan")) == "" and clean_caption(None) == ""


def test_token_limit_counts_gpt2_tokens_not_characters(tmp_path):
    from foodcap.datasets import CaptionRecord
    from foodcap.language import load_tokenizer

    tok = load_tokenizer("tiny")
    few_tokens_many_chars = "internationalization"  # 20 characters, a few tokens
    many_tokens_few_chars = "a b c d e f g h"  # 15 characters, 8 tokens
    n_few, n_many = (len(tok.encode(t)) for t in (few_tokens_many_chars, many_tokens_few_chars))
    assert n_few < 6 <= n_many and len(few_tokens_many_chars) > len(many_tokens_few_chars)
    assert count_tokens([few_tokens_many_chars, many_tokens_few_chars]) == [n_few, n_many]
    records = [CaptionRecord("/x/1.jpg", few_tokens_many_chars, 1), CaptionRecord("/x/2.jpg", many_tokens_few_chars, 2)]
    plan = plan_extraction(records, token_limit=5, test_size=0)
    assert [r.caption for _, r in plan.captions] == [few_tokens_many_chars]
    assert plan.counts["over_token_limit"] == 1 and plan.images == ["/x/1.jpg"]


def test_split_is_by_image_disjoint_and_reproducible():
    data = read_dataset(FOOD_CAPTIONS)
    plan = plan_extraction(data.records, test_size=0.3, val_size=0.1, seed=42)
    again = plan_extraction(data.records, test_size=0.3, val_size=0.1, seed=42)
    other = plan_extraction(data.records, test_size=0.3, val_size=0.1, seed=7)
    assert plan.image_splits == again.image_splits and plan.image_splits != other.image_splits
    n = len(plan.images)
    assert plan.image_splits.count("test") == round(0.3 * n) and plan.image_splits.count("val") == round(0.1 * n)
    by_split = {s: {plan.images[i] for i, x in enumerate(plan.image_splits) if x == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    # several captions of one image never straddle splits
    from foodcap.datasets import CaptionRecord

    recs = [CaptionRecord(f"/i/{i % 10}.jpg", f"caption {i}", i % 10) for i in range(50)]
    p = plan_extraction(recs, test_size=0.3, seed=1)
    assert len(p.images) == 10 and p.image_splits.count("test") == 3
    assert split_images(10, 4, 0, 0).count("test") == 4  # counts >= 1 are numbers of images


def test_duplicate_caption_pairs_are_dropped():
    from foodcap.datasets import CaptionRecord

    recs = [CaptionRecord("/a.jpg", "soup", "a"), CaptionRecord("/a.jpg", "soup", "a"), CaptionRecord("/b.jpg", "soup", "b")]
    plan = plan_extraction(recs, test_size=0)
    assert len(plan.captions) == 2 and plan.counts["duplicate_captions"] == 1 and len(plan.images) == 2
