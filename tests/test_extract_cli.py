"""parse_food.py / `foodcap extract` end to end on the tiny encoder: once per image, batching, bad files,
kill-and-resume, shards.   pytest -q tests/test_extract_cli.py
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from foodcap.commands.extract import main, output_prefix
from foodcap.encoder_tuning import resolve_precision
from foodcap.encoders import load_encoder
from foodcap.features import load_features

from conftest import FOOD_CAPTIONS, REPO
from test_datasets import make_photos

N_IMAGES, PER_IMAGE = 10, 5


@pytest.fixture
def coco_like(tmp_path):
    """10 photos x 5 captions each, as a CSV beside an images/ folder."""
    root = tmp_path / "set"
    make_photos(root / "images", [f"{i}.jpg" for i in range(N_IMAGES)])
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for j in range(PER_IMAGE):
            for i in range(N_IMAGES):
                w.writerow([f"{i}.jpg", f"photo {i} described the {j}th way"])
    return root


class Interrupt(KeyboardInterrupt):
    """Ctrl-C in the middle of an extraction, raised by interrupt_after."""


def interrupt_after(last_batch: int):
    """An `on_batch` callback that interrupts run_shard once batch `last_batch` is done."""
    def on_batch(batch_number):
        if batch_number == last_batch:
            raise Interrupt
    return on_batch


def _run(data, out, *extra):
    argv = ["--clip_model_type", "tiny", "--data_path", str(data), "--out_dir", str(out), "--num_workers", "0",
            "--device", "cpu",  # the encoder instances the tests compare with (and patch) are the CPU ones
            "--batch_size", "4", *extra]
    assert main(argv) == 0
    return {p.stem.rsplit("_", 1)[-1]: load_features(p) for p in sorted(out.glob("tiny_RN_*.pkl"))}


def _same(a, b, exact=True):
    assert a.keys() == b.keys()
    for split in a:
        assert a[split].captions == b[split].captions
        if exact:
            assert torch.equal(a[split].embeddings, b[split].embeddings), split
        else:
            assert torch.allclose(a[split].embeddings, b[split].embeddings, atol=1e-5), split


def test_outputs_layout_and_metadata(coco_like, tmp_path):
    stores = _run(coco_like / "captions.csv", tmp_path / "out", "--test_size", "0.3")
    assert set(stores) == {"train", "test"}
    train, test = stores["train"], stores["test"]
    assert (train.num_images, test.num_images) == (7, 3) and (len(train), len(test)) == (35, 15)
    for store, split in ((train, "train"), (test, "test")):
        assert store.meta["clip_model"] == "tiny" and store.clip_dim == 64 and store.split == split
    images = {s: {c["image_path"] for c in st.captions} for s, st in stores.items()}
    assert not images["train"] & images["test"]
    # each caption's row is its own image's embedding, recomputed independently here at the recorded precision
    # (`--precision auto`: bf16 on a CPU with AMX, else fp32)
    assert train.meta["clip_precision"] == resolve_precision("auto", "cpu")
    enc = load_encoder("tiny", precision=train.meta["clip_precision"])
    from foodcap.images import load_image

    for cap in test.captions:
        own = enc.encode_images(enc.preprocess(load_image(cap["image_path"]))[None])[0]
        assert torch.allclose(test.embeddings[cap["clip_embedding"]], own, atol=1e-5)
    report = json.loads((tmp_path / "out" / "tiny_RN_report.json").read_text())
    assert report["counts"]["images"] == N_IMAGES and report["skipped"] == []
    assert report["clip_precision"] == train.meta["clip_precision"]
    assert not (tmp_path / "out" / "tiny_RN_parts").exists()


def test_each_image_encoded_once(coco_like, tmp_path, monkeypatch):
    enc = load_encoder("tiny", precision="auto")  # the instance the CLI's default --precision auto gets
    calls = []
    original = enc.encode_images
    monkeypatch.setattr(enc, "encode_images", lambda pixels: calls.append(len(pixels)) or original(pixels))
    stores = _run(coco_like, tmp_path / "out", "--test_size", "0")
    assert sum(calls) == N_IMAGES and len(calls) == 3  # 10 images in batches of 4, not 50 captions one by one
    assert len(stores["train"]) == N_IMAGES * PER_IMAGE


def test_batched_equals_one_at_a_time(coco_like, tmp_path):
    batched = _run(coco_like, tmp_path / "b4", "--test_size", "0.2")
    single = _run(coco_like, tmp_path / "b1", "--test_size", "0.2", "--batch_size", "1")
    _same(batched, single, exact=False)


def test_workers_give_the_same_store(coco_like, tmp_path):
    inline = _run(coco_like, tmp_path / "w0", "--test_size", "0.2")
    workers = _run(coco_like, tmp_path / "w2", "--test_size", "0.2", "--num_workers", "2")
    _same(inline, workers)


def test_bad_files_are_skipped_and_reported(coco_like, tmp_path, capsys):
    images = coco_like / "images"
    good = (images / "0.jpg").read_bytes()
    (images / "1.jpg").unlink()  # missing
    (images / "2.jpg").write_bytes(b"")  # empty
    (images / "3.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "4.jpg").write_text("not a photo")  # not an image
    Image.new("1", (10000, 10000)).save(images / "5.jpg", format="PNG")  # too large (decompression bomb)
    stores = _run(coco_like, tmp_path / "out", "--test_size", "0")
    train = stores["train"]
    assert train.num_images == N_IMAGES - 5 and len(train) == (N_IMAGES - 5) * PER_IMAGE
    report = json.loads((tmp_path / "out" / "tiny_RN_report.json").read_text())
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert reasons == {"1.jpg": "missing", "2.jpg": "empty", "3.jpg": "truncated", "4.jpg": "not an image",
                       "5.jpg": "too large"}
    assert all(s["captions_dropped"] == PER_IMAGE for s in report["skipped"])
    summary = capsys.readouterr().err
    assert "1 empty" in summary and "1 missing" in summary and "1 too large" in summary and "report:" in summary


def test_interrupted_run_resumes_to_the_same_store(coco_like, tmp_path):
    from foodcap.datasets import read_dataset
    from foodcap.extraction import plan_extraction
    from foodcap.extractor import build_stores, merge_parts, run_shard

    plan = plan_extraction(read_dataset(coco_like).records, test_size=0.3)
    enc = load_encoder("tiny")

    def stores(parts):
        merged = merge_parts(plan, parts, encoder_name="tiny", batch_size=2)
        return build_stores(plan, merged, {"clip_model": "tiny"}, 64)

    run_shard(plan, enc, tmp_path / "full", batch_size=2, save_every=2)

    with pytest.raises(Interrupt):
        run_shard(plan, enc, tmp_path / "cut", batch_size=2, save_every=2, on_batch=interrupt_after(2))
    calls = []
    original = enc.encode_images
    enc.encode_images = lambda pixels: calls.append(len(pixels)) or original(pixels)
    try:
        resumed = run_shard(plan, enc, tmp_path / "cut", batch_size=2, save_every=2)
    finally:
        del enc.encode_images
    assert resumed.resumed_batches == 3 and sum(calls) == N_IMAGES - 6  # only the rest was encoded
    _same(stores(tmp_path / "full"), stores(tmp_path / "cut"))


def test_killed_process_resumes_with_the_same_command(coco_like, tmp_path):
    out_full, out_cut = tmp_path / "full", tmp_path / "cut"
    args = ["--data_path", str(coco_like), "--test_size", "0.3", "--save_every", "1"]
    full = _run(coco_like, out_full, *args[2:])
    # A hard kill (no clean-up at all) after the 2nd batch, in a separate process running the real CLI.
    script = textwrap.dedent(f"""
        import os, sys
        from foodcap.encoders import load_encoder
        enc = load_encoder("tiny", precision="auto"); original = enc.encode_images; seen = []
        def encode(pixels):
            if len(seen) == 2:
                os._exit(9)
            seen.append(1)
            return original(pixels)
        enc.encode_images = encode
        from foodcap.commands.extract import main
        sys.exit(main({["--clip_model_type", "tiny", "--out_dir", str(out_cut), "--num_workers", "0", "--device", "cpu",
                        "--batch_size", "4", *args]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 9, proc.stderr
    assert not list(out_cut.glob("tiny_RN_*.pkl"))  # nothing final was written
    assert len(list((out_cut / "tiny_RN_parts").rglob("chunk-*.safetensors"))) == 2
    _same(full, _run(coco_like, out_cut, *args[2:]))


def test_shards_merged_equal_a_single_run(coco_like, tmp_path, caplog):
    single = _run(coco_like, tmp_path / "single", "--test_size", "0.3")
    out = tmp_path / "sharded"
    base = ["--clip_model_type", "tiny", "--data_path", str(coco_like), "--out_dir", str(out), "--num_workers", "0",
            "--batch_size", "4", "--test_size", "0.3", "--num_shards", "3"]
    assert main(base + ["--shard_index", "0"]) == 0
    assert main(base + ["--merge"]) == 2  # shards 1 and 2 missing: refused with a clear message
    assert "shard 1 of 3 is incomplete" in caplog.text
    for i in (2, 1):
        assert main(base + ["--shard_index", str(i)]) == 0
    assert not list(out.glob("tiny_RN_*.pkl"))
    assert main(base + ["--merge"]) == 0
    _same(single, {p.stem.rsplit("_", 1)[-1]: load_features(p) for p in out.glob("tiny_RN_*.pkl")})


def test_torchrun_processes_each_extract_a_shard_and_rank0_merges(coco_like, tmp_path):
    single = _run(coco_like, tmp_path / "single", "--test_size", "0.3")
    out = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "parse_food.py"), "--clip_model_type", "tiny", "--data_path", str(coco_like),
                           "--out_dir", str(out), "--num_workers", "0", "--batch_size", "4", "--test_size", "0.3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each process encoded its own half (no shard run twice), and rank 0 merged them into the single run's stores.
    # 10 images in 3 batches of 4: shard 0 owns batch 0 (4 images), shard 1 batches 1-2 (6 images).
    assert done.stderr.count("encoded 4 images") == 1 and done.stderr.count("encoded 6 images") == 1, done.stderr[-3000:]
    _same(single, {p.stem.rsplit("_", 1)[-1]: load_features(p) for p in out.glob("tiny_RN_*.pkl")})


def test_seed_command_line_on_kaggle_layout(tmp_path, monkeypatch):
    """The seed README's command, on the real Captions.csv with photos in dataset/ (first 12 rows)."""
    root = tmp_path / "food"
    root.mkdir()
    rows = list(csv.reader(open(FOOD_CAPTIONS, newline="", encoding="utf-8")))
    with open(root / "Captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:13])
    make_photos(root / "dataset", [f"{r[1]}.jpg" for r in rows[1:13]])
    monkeypatch.chdir(tmp_path)
    assert main(["--clip_model_type", "tiny", "--data_path", "food", "--token_limit", "12", "--test_size", "0.25",
                 "--num_workers", "0"]) == 0
    train, test = load_features(tmp_path / "tiny_RN_train.pkl"), load_features(tmp_path / "tiny_RN_test.pkl")
    assert train.num_images + test.num_images == len(train) + len(test) <= 12
    assert test.num_images == round(0.25 * (train.num_images + test.num_images))
    assert {type(c["image_id"]) for c in train.captions} == {int}


def test_safetensors_output(coco_like, tmp_path):
    pkl = _run(coco_like, tmp_path / "p", "--test_size", "0.3")
    assert main(["--clip_model_type", "tiny", "--data_path", str(coco_like), "--out_dir", str(tmp_path / "s"),
                 "--num_workers", "0", "--batch_size", "4", "--test_size", "0.3", "--output_format", "safetensors"]) == 0
    st = {p.stem.rsplit("_", 1)[-1]: load_features(p) for p in (tmp_path / "s").glob("*.safetensors")}
    _same(pkl, st)


def test_clear_errors(tmp_path, caplog):
    assert main(["--clip_model_type", "tiny", "--data_path", str(tmp_path / "nothing")]) == 2
    assert "no such caption file" in caplog.text
    make_photos(tmp_path / "x", [])
    (tmp_path / "x" / "c.csv").write_text("image,caption\nmissing.jpg,soup\n")
    assert main(["--clip_model_type", "tiny", "--data_path", str(tmp_path / "x" / "c.csv")]) == 2
    assert "none of the images" in caplog.text and "--image_dir" in caplog.text


def test_output_prefix_follows_the_seed():
    assert output_prefix("RN50x4") == "RN50x4_RN"
    assert output_prefix("ViT-B/32") == "ViT-B_32_RN"
    assert output_prefix("RN50x4:/models/my weights.pt") == "RN50x4_my_weights_RN"


def test_relative_weights_path_is_recorded_absolute(coco_like, tmp_path, monkeypatch):
    from foodcap.encoders import load_encoder as build

    torch.save(build("tiny").model.state_dict(), tmp_path / "clip.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["--clip_model_type", "tiny:./clip.pt", "--data_path", str(coco_like), "--out_dir", "out",
                 "--num_workers", "0", "--batch_size", "4", "--test_size", "0"]) == 0
    store = load_features(tmp_path / "out" / "tiny_clip_RN_train.pkl")  # the seed's naming keeps the file stem
    # predict.py rebuilds the encoder from this name, maybe from another folder: it must not depend on the cwd.
    assert store.meta["clip_model"] == f"tiny:{(tmp_path / 'clip.pt').resolve()}"


def test_rerun_without_a_split_removes_the_earlier_runs_store(coco_like, tmp_path):
    out = tmp_path / "out"
    assert set(_run(coco_like, out, "--test_size", "0.3")) == {"train", "test"}
    # train.py takes `*_test.pkl` beside the data as validation: a stale one would hold images now in train.
    assert set(_run(coco_like, out, "--test_size", "0")) == {"train"}
