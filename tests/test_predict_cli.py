"""`foodcap predict` end to end on the bundled photos with tiny checkpoints (ours and ClipCap-style .pt).

    /work/venv/bin/pytest -x -q tests/test_predict_cli.py
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import pytest
import torch

from conftest import IMAGES
from foodcap.captioner import load_captioner
from foodcap.checkpoint import save_checkpoint
from foodcap.commands.predict import main

PHOTOS = sorted(str(p) for p in IMAGES.glob("*.jpg"))
INF = sorted(str(p) for p in IMAGES.glob("inf*.jpg"))
PERIOD, EOS = 13, 50256



@pytest.fixture
def checkpoint(tiny_model_factory, tmp_path) -> Path:
    return save_checkpoint(tiny_model_factory("mlp"), tmp_path / "ckpt")


def run(capsys, *argv) -> tuple[int, list[list[str]], str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line.split("\t") for line in captured.out.splitlines()], captured.err


def favour_token(model, token_id: int):
    """Make GPT-2 predict `token_id` at every position (a large final-norm bias along its tied embedding)."""
    gpt = model.gpt
    assert gpt.lm_head.weight.data_ptr() == gpt.transformer.wte.weight.data_ptr()  # tied, as in GPT-2
    direction = torch.zeros(gpt.config.n_embd)
    direction[0] = 1.0
    with torch.no_grad():
        gpt.transformer.wte.weight[token_id] = direction
        gpt.transformer.ln_f.bias += 20 * direction
    return model


def test_captions_a_folder_and_reports_broken_images(checkpoint, tmp_path, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a photo")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(Path(INF[0]).read_bytes()[:3000])
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "captions.jsonl"
    code, lines, err = run(capsys, "--load_pt", checkpoint, "--img", IMAGES, not_image, truncated, missing,
                           "--max_length", 5, "--out", out)
    assert code == 1
    assert [line[0] for line in lines] == PHOTOS  # every good photo, in order; captions.csv is not an image
    assert all(len(line) == 2 and line[1].strip() for line in lines)
    for path, reason in ((not_image, "not an image"), (truncated, "truncated"), (missing, "missing")):
        assert any(str(path) in row and reason in row for row in err.splitlines()), (path, err)
    records = [json.loads(row) for row in out.read_text().splitlines()]
    assert [r["image"] for r in records] == PHOTOS + [str(not_image), str(truncated), str(missing)]
    assert [r["caption"] for r in records[:len(PHOTOS)]] == [line[1] for line in lines]
    assert all("error" in r for r in records[len(PHOTOS):])
    # the CLI's default sampling is the library's, image for image
    library = load_captioner(checkpoint, device="cpu").caption(PHOTOS[:3], do_sample=True, temperature=1.0,
                                                                top_p=0.8, seed=0, max_new_tokens=5)
    assert library == [line[1] for line in lines[:3]]


def test_same_command_same_captions_and_flags_change_them(checkpoint, capsys):
    args = ["--load_pt", checkpoint, "--img", f"{IMAGES}/inf*.jpg", "--max_length", 6]
    code, first, _ = run(capsys, *args)
    assert code == 0 and [line[0] for line in first] == INF  # a glob
    assert run(capsys, *args)[1] == first
    assert run(capsys, *args, "--seed", 1)[1] != first
    assert run(capsys, *args, "--temp", 0.5)[1] != first
    greedy = run(capsys, *args, "--greedy")[1]
    captioner = load_captioner(checkpoint, device="cpu")
    assert [line[1] for line in greedy] == captioner.caption(INF, max_new_tokens=6)
    code, beams, _ = run(capsys, *args, "--beam", "--beam_size", 3, "--num_captions", 2, "--batch_size", 3)
    assert code == 0 and all(len(line) == 3 for line in beams)
    expected = captioner.caption(INF, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert [line[1:] for line in beams] == expected


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_out_files(checkpoint, tmp_path, capsys, suffix):
    out = tmp_path / "results" / f"captions{suffix}"
    code, lines, _ = run(capsys, "--load_pt", checkpoint, "--img", *INF, "--max_length", 4, "--greedy", "--out", out)
    assert code == 0
    if suffix == ".json":
        data = json.loads(out.read_text())
        assert data["decoding"]["do_sample"] is False
        pairs = [(r["image"], r["caption"]) for r in data["results"]]
    else:
        rows = list(csv.DictReader(out.open()))
        pairs = [(r["image"], r["caption"]) for r in rows]
        assert {r["rank"] for r in rows} == {"1"}
    assert pairs == [tuple(line) for line in lines]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind


def test_default_checkpoint_path_is_the_forks(tiny_model_factory, tmp_path, monkeypatch, capsys):
    save_checkpoint(tiny_model_factory("mlp"), tmp_path / "model_checkpoints" / "best")
    monkeypatch.chdir(tmp_path)
    code, lines, _ = run(capsys, "--img", INF[0], "--max_length", 3)
    assert code == 0 and lines[0][0] == INF[0]


def test_encoder_width_mismatch_fails_before_any_image_is_read(tiny_model_factory, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model_factory("mlp", clip_dim=32), tmp_path / "ckpt32")
    broken = tmp_path / "broken.jpg"
    broken.write_text("x")
    code, lines, err = run(capsys, "--load_pt", ckpt, "--img", broken)
    assert code == 2 and not lines
    assert "64" in err and "32" in err and "broken.jpg" not in err


def test_bad_checkpoint_and_bad_options_are_clear_errors(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "--load_pt", tmp_path / "nowhere", "--img", INF[0])
    assert code == 2 and "nowhere" in err
    code, _, err = run(capsys, "--load_pt", checkpoint, "--img", INF[0], "--out", tmp_path / "c.txt")
    assert code == 2 and ".txt" in err
    code, _, err = run(capsys, "--load_pt", checkpoint, "--img", INF[0], "--greedy", "--num_captions", 2)
    assert code == 2 and "greedy" in err
    code, lines, err = run(capsys, "--load_pt", checkpoint, "--img", f"{tmp_path}/*.png", INF[0], "--max_length", 3)
    assert code == 1 and len(lines) == 1 and "no files match" in err


def test_clipcap_pt_stops_at_a_period_that_stays_in_the_caption(tiny_model_factory, tmp_path, capsys):
    model = favour_token(tiny_model_factory("mlp", only_prefix=False), PERIOD)
    torch.save(model.state_dict(), tmp_path / "coco_weights.pt")  # how ClipCap saves its checkpoints
    args = ["--load_pt", tmp_path / "coco_weights.pt", "--clip_model_type", "tiny", "--img", *INF, "--max_length", 4]
    for mode in ("--greedy", "--beam", "--temp=1.0"):
        code, lines, _ = run(capsys, *args, mode)
        assert code == 0 and [line[1] for line in lines] == ["."] * len(INF)
    assert {line[1] for line in run(capsys, *args, "--stop_token", ",")[1]} == {"...."}  # max_length tokens
    # our checkpoints stop at EOS instead: the same weights run on to the length limit
    ours = save_checkpoint(model, tmp_path / "ours")
    assert {line[1] for line in run(capsys, "--load_pt", ours, "--img", INF[0], "--max_length", 4)[1]} == {"...."}


def test_our_checkpoint_drops_the_eos_it_stops_at(tiny_model_factory, tmp_path, capsys):
    ckpt = save_checkpoint(favour_token(tiny_model_factory("mlp", only_prefix=False), EOS), tmp_path / "eos")
    code, lines, _ = run(capsys, "--load_pt", ckpt, "--img", INF[0], "--max_length", 4, "--beam")
    assert code == 0 and lines == [[INF[0], ""]]


def test_eval_scores_a_feature_store_and_reports_its_captions(checkpoint, tmp_path, capsys):
    from foodcap.features import FeatureStore, load_features, save_features

    torch.manual_seed(0)
    captions = [{"image_id": f"img{i}", "caption": text, "clip_embedding": i}
                for i, text in enumerate(["a bowl of soup", "a plate of pasta", "a cup of tea"])]
    store = tmp_path / "tiny_test.pkl"
    save_features(FeatureStore(torch.randn(3, 64), captions, {"clip_model": "tiny", "split": "test"}), store)
    code, _, err = run(capsys, "--load_pt", checkpoint, "--eval", "--data", store, "--greedy",
                       "--max_length", "8", "--eval_dir", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "CIDEr" in json.dumps(metrics) and "BLEU-4" in json.dumps(metrics)
    # The report shows the captions the library gives for the store's rows (greedy, same checkpoint).
    expected = load_captioner(checkpoint, device="cpu").caption_embeddings(load_features(store).embeddings,
                                                                           max_new_tokens=8)
    page = html.unescape((tmp_path / "eval" / "report.html").read_text())
    assert all(c in page for c in expected if c.strip())
    assert "<img class='thumb'" not in page  # the store records no photos
    # --eval_images: photos named by image_id in a folder become the report's thumbnails
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.open(INF[i]).save(photos / f"img{i}.jpg")
    code, _, err = run(capsys, "--load_pt", checkpoint, "--eval", "--data", store, "--greedy", "--max_length", "8",
                       "--eval_dir", tmp_path / "eval2", "--eval_images", photos)
    assert code == 0, err
    assert (tmp_path / "eval2" / "report.html").read_text().count("<img class='thumb'") == 3
    code, _, err = run(capsys, "--load_pt", checkpoint, "--eval", "--data", store, "--eval_images", tmp_path / "nope")
    assert code == 2 and "nope: no such folder" in err

    code, _, err = run(capsys, "--load_pt", checkpoint, "--eval")
    assert code == 2 and "--eval needs --data" in err
    code, _, err = run(capsys, "--load_pt", checkpoint)
    assert code == 2 and "--img is required" in err


def test_expand_images_files_folders_globs_and_bracketed_names(tmp_path):
    import shutil

    from foodcap.commands.predict import expand_images

    bracketed = tmp_path / "dish[1].jpg"  # glob syntax in a real file name: the file itself
    shutil.copy(INF[0], bracketed)
    (tmp_path / "sub").mkdir()
    shutil.copy(INF[1], tmp_path / "sub" / "b.JPG")
    paths, unmatched = expand_images([str(bracketed), str(tmp_path / "sub"), f"{IMAGES}/inf*.jpg", INF[0],
                                      str(tmp_path / "none*.png"), str(tmp_path)])
    assert paths == [str(bracketed), str(tmp_path / "sub" / "b.JPG"), *INF]  # in order, repeats dropped
    assert [p for p, _ in unmatched] == [str(tmp_path / "none*.png")]


def test_unwritable_out_is_a_clear_error_after_the_captions(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, lines, err = run(capsys, "--load_pt", checkpoint, "--img", INF[0], "--max_length", 3, "--greedy",
                           "--out", blocker / "captions.json")
    assert code == 2 and [line[0] for line in lines] == [INF[0]]
    assert "--out" in err and "captions.json" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [None, "--no-fast_jpeg"])
def test_large_jpegs_reach_clip_as_extraction_decodes_them(checkpoint, tmp_path, capsys, monkeypatch, flag):
    from PIL import Image

    from foodcap.encoders import load_encoder
    from foodcap.images import load_image

    photo = tmp_path / "big.jpg"
    Image.open(INF[0]).convert("RGB").resize((1224, 814)).save(photo, quality=90)
    encoder = load_encoder("tiny", device="cpu")  # the instance predict's captioner uses (cached)
    seen = []
    original = encoder.encode_images
    monkeypatch.setattr(encoder, "encode_images", lambda pixels: seen.append(pixels) or original(pixels))
    code, lines, err = run(capsys, "--load_pt", checkpoint, "--img", photo, "--greedy", "--max_length", "3",
                           "--device", "cpu", *([flag] if flag else []))
    assert code == 0, err
    min_side = None if flag else 2 * encoder.image_size  # default: reduced scale, as parse_food.py
    assert load_image(photo, min_side=min_side).size == ((1224, 814) if flag else (306, 204))
    assert torch.equal(seen[0][0], encoder.preprocess(load_image(photo, min_side=min_side)))
