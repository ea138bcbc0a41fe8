"""CLIP encoder registry: names, widths, seeded tiny/random backbones, local weight files.

    pytest -q tests/test_encoders.py
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

from foodcap import encoders
from foodcap.encoders import EncoderLoadError, encoder_width, load_encoder
from foodcap.images import load_image

from conftest import IMAGES, REPO


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("tiny")


def _pixels(encoder, names=("inf1.jpg", "scone.jpg", "CONCEPTUAL_01.jpg")):
    return torch.stack([encoder.preprocess(load_image(IMAGES / n)) for n in names])  # (B, 3, H, W)


def test_tiny_reports_width_and_preprocessing(tiny):
    assert tiny.embed_dim == encoder_width("tiny") == 64
    assert tiny.image_size == 64 and tiny.preprocess_config["size"] == 64
    pixels = _pixels(tiny)
    assert pixels.shape == (3, 3, 64, 64)
    emb = tiny.encode_images(pixels)
    assert emb.shape == (3, 64) and emb.dtype == torch.float32
    assert not torch.allclose(emb[0], emb[1])  # different photos, different embeddings
    text = tiny.encode_text(["a bowl of soup", "blueberry muffins on a board"])
    assert text.shape == (2, 64) and not torch.allclose(text[0], text[1])


def test_load_encoder_is_cached_per_name_and_device(tiny):
    assert load_encoder("tiny") is tiny
    assert load_encoder("tiny", device="cpu") is tiny


def test_tiny_weights_are_identical_in_a_fresh_process(tiny, tmp_path):
    out = tmp_path / "emb.pt"
    code = ("import torch; from foodcap.encoders import load_encoder; from foodcap.images import load_image; "
            f"e = load_encoder('tiny'); x = e.preprocess(load_image(r'{IMAGES / 'inf1.jpg'}'))[None]; "
            f"torch.save({{'emb': e.encode_images(x), 'sd': e.model.state_dict()}}, r'{out}')")
    env = dict(os.environ, PYTHONHASHSEED="7")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
    other = torch.load(out, weights_only=True)
    mine = tiny.model.state_dict()
    assert other["sd"].keys() == mine.keys()
    assert all(torch.equal(other["sd"][k], mine[k]) for k in mine)
    assert torch.equal(other["emb"], tiny.encode_images(_pixels(tiny, ("inf1.jpg",))))


def test_openai_widths_match_open_clip_architectures():
    from open_clip.factory import get_model_config

    names = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for name in names:
        arch = encoders.OPENAI_MODELS[name][0]
        assert encoder_width(name) == get_model_config(arch)["embed_dim"], name
        assert arch.endswith("-quickgelu")  # OpenAI's weights were trained with QuickGELU
    assert encoder_width("ViT-B-32:laion2b_s34b_b79k") == 512
    assert encoder_width("random:RN50x4") == encoder_width("RN50x4")
    assert encoder_width("no-such-model") is None


def test_random_architecture_is_seeded_and_real_size():
    first = load_encoder("random:RN50")
    assert first.embed_dim == encoder_width("RN50") and first.image_size == 224
    encoders._CACHE.clear()
    second = load_encoder("random:RN50")
    assert second is not first
    w1, w2 = first.model.visual.conv1.weight, second.model.visual.conv1.weight
    assert torch.equal(w1, w2)
    encoders._CACHE.clear()


def _perturbed(tiny):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["torch", "safetensors", "torchscript", "wrapped"])
def test_local_weights_file(tiny, tmp_path, kind):
    model = _perturbed(tiny)
    if kind == "torch":
        path = tmp_path / "w.pt"
        torch.save(model.state_dict(), path)
    elif kind == "wrapped":  # training checkpoints: {"state_dict": {"module.x": ...}}
        path = tmp_path / "ckpt.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:  # the format of OpenAI's own RN50x4.pt: a TorchScript archive, read without running its code
        path = tmp_path / "scripted.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(path))
    loaded = load_encoder(f"tiny:{path}")
    assert loaded.embed_dim == 64
    expected = model.state_dict()
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got["visual.conv1.weight"], tiny.model.state_dict()["visual.conv1.weight"])


def test_weights_file_errors(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(f"tiny:{tmp_path / 'missing.pt'}")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(EncoderLoadError, match="does not fit"):
        load_encoder(f"tiny:{wrong}")
    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.nn.Linear(2, 2)}, evil)  # a pickled module: refused by weights_only loading
    with pytest.raises(EncoderLoadError, match=str(evil)):
        load_encoder(f"tiny:{evil}")


def test_unknown_name_and_missing_tag_say_what_to_use():
    with pytest.raises(EncoderLoadError, match="tiny"):
        load_encoder("definitely-not-clip")
    with pytest.raises(EncoderLoadError, match="pretrained tag"):
        load_encoder("ViT-B-32")  # an open_clip architecture needs weights named


def test_offline_openai_name_explains_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path))  # no cached clip-package weights either
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest) so the download fails fast")
    with pytest.raises(EncoderLoadError) as info:
        load_encoder("RN50")
    message = str(info.value)
    assert "RN50:/path/to/weights.pt" in message and "'tiny'" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 path needs CUDA")
def test_cuda_runs_fp16_and_returns_fp32():
    enc = load_encoder("tiny", device="cuda")
    assert enc.model.visual.conv1.weight.dtype == torch.float16
    emb = enc.encode_images(_pixels(enc))
    assert emb.dtype == torch.float32 and emb.device.type == "cuda"
    ref = load_encoder("tiny").encode_images(_pixels(enc))
    assert torch.allclose(emb.cpu(), ref, atol=5e-2, rtol=5e-2)
