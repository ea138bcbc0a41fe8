"""`foodcap serve`: the /caption API against Captioner.caption, bad input, batching under load, the CLI.

    pytest -x -q tests/test_serve.py

Every server here listens on 127.0.0.1 only and makes no outside connection (no share link, no analytics).
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest
import torch

from conftest import IMAGES, REPO

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from foodcap.captioner import load_captioner  # noqa: E402
from foodcap.decoding import caption_images  # noqa: E402
from foodcap.serve import ServeConfig, create_app  # noqa: E402
from foodcap.serve_batching import CaptionBatcher  # noqa: E402

MAX_NEW_TOKENS = 12  # short captions keep the tiny model's decoding fast
PHOTOS = [IMAGES / "inf1.jpg", IMAGES / "scone.jpg", IMAGES / "CONCEPTUAL_03.jpg", IMAGES / "COCO_val2014_000000060623.jpg"]
MAX_UPLOAD_MB = 1.0  # every bundled photo is under 250 kB
MAX_BATCH = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_checkpoint(directory):
    from foodcap.checkpoint import save_checkpoint
    from foodcap.language import load_language_model
    from foodcap.model import ClipCaptionModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(mapping_type="mlp", prefix_length=4, clip_length=4, num_layers=2, clip_dim=64,
                         gpt2="tiny", clip_model="tiny", only_prefix=True)
    save_checkpoint(ClipCaptionModel(config, load_language_model("tiny")).eval(), directory)
    return directory


def api_args(files, mode="beam", temperature=1.0, top_p=0.9, num_beams=3, num_captions=1, seed=0,
             max_new_tokens=MAX_NEW_TOKENS) -> dict:
    return dict(files=[handle_file(str(f)) for f in files], mode=mode, temperature=temperature, top_p=top_p,
                num_beams=num_beams, num_captions=num_captions, seed=seed, max_new_tokens=max_new_tokens)


def api_captions(client, files, **options) -> list:
    """Per file: its caption (a str), or its captions (a list) when more than one was asked for."""
    _gallery, result = client.predict(**api_args(files, **options), api_name="/caption")
    assert [item["file"] for item in result["results"]] == [f.name for f in files]
    captions = [item["captions"] for item in result["results"]]
    return [c[0] if options.get("num_captions", 1) == 1 else c for c in captions]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A Captioner of its own (not the server's), loaded from the same checkpoint."""
    return load_captioner(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(checkpoint):
    config = ServeConfig(max_batch_size=MAX_BATCH, batch_wait_ms=50, max_upload_mb=MAX_UPLOAD_MB,
                         max_images_per_request=4)
    app = create_app(load_captioner(checkpoint, device="cpu"), config)
    app.launch("127.0.0.1", free_port(), quiet=True)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, download_files=False, verbose=False, analytics_enabled=False)


def test_server_listens_on_loopback_only(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.demo.server_name == "127.0.0.1"


@pytest.mark.parametrize("options, decoding", [
    (dict(mode="greedy"), dict()),
    (dict(mode="beam", num_beams=3, num_captions=2), dict(num_beams=3, num_return_sequences=2)),
    (dict(mode="sampling", temperature=0.8, top_p=0.9, seed=7, num_captions=2),
     dict(do_sample=True, temperature=0.8, top_p=0.9, seed=7, num_return_sequences=2)),
], ids=["greedy", "beam", "sampling"])
def test_api_returns_what_captioner_caption_returns(client, reference, options, decoding):
    photos = PHOTOS[:2]  # one request with two photos: one batch, as in Captioner.caption(photos)
    expected = reference.caption([str(p) for p in photos], max_new_tokens=MAX_NEW_TOKENS, **decoding)
    assert api_captions(client, photos, **options) == expected
    assert api_captions(client, photos[1:], **options) == reference.caption(
        [str(photos[1])], max_new_tokens=MAX_NEW_TOKENS, **decoding)


def test_sampling_seed_decides_the_captions(client):
    photo = PHOTOS[:1]
    first = api_captions(client, photo, mode="sampling", seed=1, num_captions=3, temperature=1.5)
    assert api_captions(client, photo, mode="sampling", seed=1, num_captions=3, temperature=1.5) == first
    assert api_captions(client, photo, mode="sampling", seed=2, num_captions=3, temperature=1.5) != first


def write_bomb_png(path, width=30000, height=30000):
    """A few hundred bytes whose header promises 900 megapixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def assert_refused(client, match: str, files, **options):
    with pytest.raises(gradio_client.exceptions.AppError, match=match):
        client.predict(**api_args(files, **options), api_name="/caption")


def test_bad_input_is_refused_readably_and_the_server_keeps_serving(client, server, reference, tmp_path):
    text = tmp_path / "menu.jpg"
    text.write_text("this is a menu, not a photo\n")
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(PHOTOS[0].read_bytes()[: PHOTOS[0].stat().st_size // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000

    assert_refused(client, r"menu\.jpg: not an image", [text])
    assert_refused(client, r"half\.jpg: truncated", [truncated])
    assert_refused(client, r"empty\.jpg: empty", [empty])
    assert_refused(client, r"bomb\.png: too large.*megapixels", [bomb])
    assert_refused(client, r"no photo in the request", [])
    assert_refused(client, r"at most 4", PHOTOS + PHOTOS[:1])  # max_images_per_request=4
    # one bad photo among good ones fails its request, naming the bad one
    assert_refused(client, r"menu\.jpg: not an image", [PHOTOS[0], text])
    assert_refused(client, r"beam size 2 can return at most 2 captions", PHOTOS[:1], num_beams=2, num_captions=3)
    assert_refused(client, r"'fancy'.*not in the list of choices", PHOTOS[:1], mode="fancy")  # Gradio's check
    assert_refused(client, r"less than minimum", PHOTOS[:1], mode="sampling", temperature=-1)  # Gradio too

    calls_before = server.stats.decode_calls
    assert api_captions(client, PHOTOS[:1], mode="greedy") == reference.caption(
        [str(PHOTOS[0])], max_new_tokens=MAX_NEW_TOKENS)
    assert server.stats.decode_calls == calls_before + 1  # refused requests never reached the model


def test_upload_size_is_capped(client, server, tmp_path):
    import httpx

    limit = int(MAX_UPLOAD_MB * 1024 * 1024)
    big = tmp_path / "big.jpg"
    big.write_bytes(PHOTOS[0].read_bytes() * (limit // PHOTOS[0].stat().st_size + 2))
    assert big.stat().st_size > limit
    # gradio_client reads the cap from the server and refuses before sending ...
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {limit} bytes"):
        client.predict(**api_args([big]), api_name="/caption")
    # ... and the server refuses a client that sends anyway
    response = httpx.post(f"{server.url}gradio_api/upload", timeout=30,
                          files={"files": ("big.jpg", big.read_bytes(), "image/jpeg")})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert len(api_captions(client, PHOTOS[:1], mode="greedy")) == 1


def test_32_concurrent_requests_are_batched_and_each_answered_right(client, server, reference):
    # Greedy and beam: their captions do not depend on what else shares the batch, so each answer can be
    # checked exactly. (Sampled captions in a shared batch may differ by float rounding; the API test
    # above checks sampling request by request.)
    option_sets = [
        (dict(mode="greedy"), dict()),
        (dict(mode="beam", num_beams=3, num_captions=2), dict(num_beams=3, num_return_sequences=2)),
        (dict(mode="beam", num_beams=2), dict(num_beams=2)),
    ]
    expected = {}
    for k, (_, decoding) in enumerate(option_sets):
        captions = reference.caption([str(p) for p in PHOTOS], max_new_tokens=MAX_NEW_TOKENS, **decoding)
        expected.update({(k, photo): caption for photo, caption in zip(PHOTOS, captions)})
    requests = [(i % len(option_sets), PHOTOS[(i // len(option_sets)) % len(PHOTOS)]) for i in range(32)]
    before = dict(server.stats.as_dict())

    started = time.monotonic()
    jobs = [client.submit(**api_args([photo], **option_sets[k][0]), api_name="/caption") for k, photo in requests]
    answers = [job.result(timeout=120) for job in jobs]
    elapsed = time.monotonic() - started

    for (k, photo), (_gallery, result) in zip(requests, answers):
        captions = result["results"][0]["captions"]
        assert result["results"][0]["file"] == photo.name
        assert (captions[0] if len(captions) == 1 else captions) == expected[(k, photo)], (k, photo.name)
    after = server.stats.as_dict()
    assert after["requests"] - before["requests"] == 32
    assert after["images"] - before["images"] == 32
    decode_calls = after["decode_calls"] - before["decode_calls"]
    assert len(option_sets) <= decode_calls < 32, decode_calls  # options never mix in one call
    assert after["largest_batch"] <= MAX_BATCH
    assert elapsed < 120
    assert client.predict(api_name="/stats") == after  # the same counters over HTTP


def test_batcher_isolates_a_failing_option_group(reference):
    """Requests sharing a batch but not options: a group whose decoding fails fails alone."""
    images = [str(p) for p in PHOTOS[:2]]
    batcher = CaptionBatcher(lambda batch, **options: caption_images(reference, batch, **options),
                             max_batch_size=3, max_wait_s=0.5)
    try:
        good = [batcher.submit(images[:1], dict(max_new_tokens=MAX_NEW_TOKENS)),
                batcher.submit(images[1:], dict(max_new_tokens=MAX_NEW_TOKENS))]
        # unvalidated options that decoding refuses (more captions than beams)
        bad = batcher.submit(images[:1], dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=2, num_return_sequences=3))
        overflow = batcher.submit(images, dict(max_new_tokens=MAX_NEW_TOKENS))  # 5 images > 3: next batch
        expected = reference.caption(images, max_new_tokens=MAX_NEW_TOKENS)
        assert [f.result(timeout=60) for f in good] == [[[expected[0]]], [[expected[1]]]]  # per image, its captions
        with pytest.raises(ValueError, match="num_return_sequences"):
            bad.result(timeout=60)
        assert overflow.result(timeout=60) == [[c] for c in expected]
    finally:
        batcher.close()
    stats = batcher.stats
    assert stats.decode_calls == 3 and stats.failed_calls == 1 and stats.batches == 2
    assert stats.largest_batch == 2 and stats.requests == 4


def test_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
    from foodcap.commands.serve import main

    assert main(["--load_pt", str(tmp_path / "nothing_here")]) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert main(["--load_pt", str(tmp_path), "--max_upload_mb", "0"]) == 2
    assert "--max_upload_mb must be positive" in capsys.readouterr().err


def test_cli_serves_on_loopback_until_stopped(checkpoint, reference, tmp_path):
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "foodcap", "serve", "--load_pt", str(checkpoint),
                                    "--port", str(port), "--max_upload_mb", "2"],
                                   cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.3)
            cli_client = Client(url, download_files=False, verbose=False, analytics_enabled=False)
            assert api_captions(cli_client, PHOTOS[:1], mode="greedy") == reference.caption(
                [str(PHOTOS[0])], max_new_tokens=MAX_NEW_TOKENS)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert f"http://127.0.0.1:{port}" in log_path.read_text()



def test_cli_takes_predicts_clip_flag_and_the_short_one():
    from foodcap.commands.serve import build_parser

    for flag in ("--clip_model_type", "--clip_model"):
        assert build_parser().parse_args(["--load_pt", "ckpt", flag, "RN50x4"]).clip_model == "RN50x4"


@pytest.mark.parametrize("fast_jpeg", [True, False])
def test_uploaded_jpegs_decode_as_extraction_decodes_them(reference, tmp_path, fast_jpeg):
    from PIL import Image

    from foodcap.serve import CaptionService

    photo = tmp_path / "phone.jpg"
    Image.open(PHOTOS[0]).convert("RGB").resize((1224, 814)).save(photo, quality=90)
    service = CaptionService(reference, ServeConfig(fast_jpeg=fast_jpeg))
    try:
        _paths, _names, images, _options = service.prepare([str(photo)], "greedy", 1.0, 0.9, 5, 1, 0, 5)
    finally:
        service.close()
    # tiny CLIP takes 64 px: the default keeps >= 128 px per side, i.e. 1/4 scale; --no-fast_jpeg the full photo
    assert images[0].size == ((306, 204) if fast_jpeg else (1224, 814))
