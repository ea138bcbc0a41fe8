"""What extraction trades for speed: BatchNorm folding, precision, reduced-scale JPEG decoding; how each is
recorded, resumed and merged.
    pytest -q tests/test_extraction_numerics.py
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from foodcap import encoder_tuning, encoders
from foodcap.commands.extract import _default_workers
from foodcap.encoder_tuning import fold_batch_norms, resolve_precision
from foodcap.encoders import load_encoder

from test_extract_cli import Interrupt, coco_like, interrupt_after  # noqa: F401 - coco_like is a fixture


def test_folding_keeps_the_resnet_function():
    plain = copy.deepcopy(load_encoder("random:RN50", fold_norms=False).model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.visual.modules())
    with torch.no_grad():  # non-trivial statistics, so a wrong fold cannot hide behind mean 0 / var 1
        for m in plain.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)
    with torch.inference_mode():
        expected = plain.encode_image(pixels)  # (B, D)
    # RN50: 3 in the stem, 3 in each of 16 bottlenecks, 1 in each of the 4 downsampling branches
    assert fold_batch_norms(plain.visual) == 3 + 16 * 3 + 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.visual.modules())
    with torch.inference_mode():
        got = plain.encode_image(pixels)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_built_resnet_encoder_has_no_batchnorm_and_vit_is_untouched():
    folded, plain = load_encoder("random:RN50"), load_encoder("random:RN50", fold_norms=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.visual.modules())
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # (B, 3, H, W)
    expected = plain.encode_images(pixels)
    assert torch.allclose(folded.encode_images(pixels), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    tiny = load_encoder("tiny")
    assert fold_batch_norms(tiny.model.visual) == 0  # a ViT has no BatchNorm
    for key in [k for k in encoders._CACHE if k[0] == "random:RN50"]:
        del encoders._CACHE[key]  # 100 MB each


def test_precision_resolution(monkeypatch):
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision(None, "cuda") == "fp16"
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(encoder_tuning, "cpu_has_amx", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(encoder_tuning, "cpu_has_amx", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="one of"):
        resolve_precision("int8", "cpu")


def test_bf16_embeddings_are_close_to_fp32_and_batch_stable():
    fp32, bf16 = load_encoder("tiny", precision="fp32"), load_encoder("tiny", precision="bf16")
    assert bf16 is not fp32 and bf16.precision == "bf16" and load_encoder("tiny") is fp32
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
    a, b = fp32.encode_images(pixels), bf16.encode_images(pixels)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # it did run in bf16
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    one_at_a_time = torch.cat([bf16.encode_images(pixels[i:i + 1]) for i in range(6)])
    assert torch.allclose(b, one_at_a_time, atol=2e-2 * float(b.abs().max()))


def test_decoding_workers_follow_the_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _default_workers("cpu") == 0 and _default_workers("cuda") == 1
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert _default_workers("cpu") == 4 and _default_workers("cuda") == 8


def _plan(root):
    from foodcap.datasets import read_dataset
    from foodcap.extraction import plan_extraction

    return plan_extraction(read_dataset(root).records, test_size=0)


def test_resume_at_another_precision_starts_afresh(coco_like, tmp_path):  # noqa: F811
    from foodcap.extractor import merge_parts, run_shard

    plan = _plan(coco_like)
    fp32, bf16 = load_encoder("tiny", precision="fp32"), load_encoder("tiny", precision="bf16")

    with pytest.raises(Interrupt):
        run_shard(plan, fp32, tmp_path / "parts", batch_size=2, save_every=1, on_batch=interrupt_after(1))
    again = run_shard(plan, bf16, tmp_path / "parts", batch_size=2, save_every=1)
    assert again.resumed_batches == 0 and again.encoded == len(plan.images)
    run_shard(plan, bf16, tmp_path / "clean", batch_size=2)
    mixed = merge_parts(plan, tmp_path / "parts", encoder_name="tiny", batch_size=2)
    clean = merge_parts(plan, tmp_path / "clean", encoder_name="tiny", batch_size=2)
    assert mixed.encoder["precision"] == "bf16"
    assert all(torch.equal(mixed.rows[i], clean.rows[i]) for i in clean.rows)


def test_shards_at_different_precisions_are_not_merged(coco_like, tmp_path):  # noqa: F811
    from foodcap.extractor import ExtractionError, merge_parts, run_shard

    plan = _plan(coco_like)
    run_shard(plan, load_encoder("tiny", precision="fp32"), tmp_path, batch_size=2, shard_index=0, num_shards=2)
    run_shard(plan, load_encoder("tiny", precision="bf16"), tmp_path, batch_size=2, shard_index=1, num_shards=2)
    with pytest.raises(ExtractionError, match="shard 0: fp32, fast JPEG decoding; shard 1: bf16, fast"):
        merge_parts(plan, tmp_path, encoder_name="tiny", batch_size=2, num_shards=2)


def test_shards_from_an_older_version_are_named_and_the_advice_works(coco_like, tmp_path):  # noqa: F811
    import json

    from safetensors.torch import load_file, save_file

    from foodcap.extractor import ExtractionError, merge_parts, run_shard, shard_dir

    plan, enc = _plan(coco_like), load_encoder("tiny", precision="fp32")
    for shard in (0, 1):
        run_shard(plan, enc, tmp_path, batch_size=2, shard_index=shard, num_shards=2)
    merge_parts(plan, tmp_path, encoder_name="tiny", batch_size=2, num_shards=2)  # consistent: fine
    for chunk in shard_dir(tmp_path, 1, 2).glob("chunk-*.safetensors"):  # as the version before this one wrote
        from safetensors import safe_open

        with safe_open(str(chunk), framework="pt") as f:
            meta = f.metadata()
        info = json.loads(meta["encoder"])
        del info["precision"], info["fast_jpeg"]
        save_file(load_file(str(chunk)), str(chunk), metadata={**meta, "encoder": json.dumps(info)})
    with pytest.raises(ExtractionError, match="shard 1: made by an older foodcap") as err:
        merge_parts(plan, tmp_path, encoder_name="tiny", batch_size=2, num_shards=2)
    assert "rerun every shard with the same explicit --precision" in str(err.value)
    # the advice: rerun every shard with the same flags; shard 0 is complete, shard 1 is encoded afresh
    assert run_shard(plan, enc, tmp_path, batch_size=2, shard_index=0, num_shards=2).encoded == 0
    assert run_shard(plan, enc, tmp_path, batch_size=2, shard_index=1, num_shards=2).resumed_batches == 0
    merged = merge_parts(plan, tmp_path, encoder_name="tiny", batch_size=2, num_shards=2)
    assert len(merged.rows) == len(plan.images)


@pytest.fixture
def large_jpegs(tmp_path):
    """Four real photos at 1224 x 814 (tiny's 64 px input lets them decode at 1/4 scale) with two captions each."""
    from PIL import Image

    from conftest import IMAGES

    root = tmp_path / "large"
    (root / "images").mkdir(parents=True)
    lines = ["image,caption"]
    for i, photo in enumerate(sorted(IMAGES.glob("*.jpg"))[:4]):
        Image.open(photo).convert("RGB").resize((1224, 814)).save(root / "images" / f"{i}.jpg", quality=90)
        lines += [f"{i}.jpg,dish {i} seen one way", f"{i}.jpg,dish {i} seen another way"]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fast_jpeg_is_recorded_and_close_to_a_full_decode(large_jpegs, tmp_path):
    from foodcap.commands.extract import main
    from foodcap.features import load_features
    from foodcap.images import load_image

    common = ["--clip_model_type", "tiny", "--data_path", str(large_jpegs), "--test_size", "0", "--precision", "fp32"]
    assert main(common + ["--out_dir", str(tmp_path / "fast")]) == 0
    assert main(common + ["--out_dir", str(tmp_path / "full"), "--no-fast_jpeg"]) == 0
    fast = load_features(tmp_path / "fast" / "tiny_RN_train.pkl")
    full = load_features(tmp_path / "full" / "tiny_RN_train.pkl")
    assert fast.meta["fast_jpeg"] is True and full.meta["fast_jpeg"] is False
    assert not torch.equal(fast.embeddings, full.embeddings)  # the reduced decode did happen
    assert torch.nn.functional.cosine_similarity(fast.embeddings, full.embeddings).min() > 0.999
    enc = load_encoder("tiny", precision="fp32")
    for cap in fast.captions:  # each row is exactly its image decoded at the reduced scale
        pixels = enc.preprocess(load_image(cap["image_path"], min_side=2 * enc.image_size))[None]
        assert torch.allclose(fast.embeddings[cap["clip_embedding"]], enc.encode_images(pixels)[0], atol=1e-5)


def test_resume_or_merge_across_jpeg_decoding_is_refused(large_jpegs, tmp_path):
    from foodcap.extractor import ExtractionError, merge_parts, run_shard

    plan, enc = _plan(large_jpegs), load_encoder("tiny", precision="fp32")
    run_shard(plan, enc, tmp_path / "a", batch_size=1, fast_jpeg=False, save_every=1)
    again = run_shard(plan, enc, tmp_path / "a", batch_size=1, fast_jpeg=True)
    assert again.resumed_batches == 0 and again.encoded == 4  # the full-decode parts were not reused
    run_shard(plan, enc, tmp_path / "b", batch_size=1, shard_index=0, num_shards=2, fast_jpeg=True)
    run_shard(plan, enc, tmp_path / "b", batch_size=1, shard_index=1, num_shards=2, fast_jpeg=False)
    with pytest.raises(ExtractionError, match="shard 0: fp32, fast JPEG decoding; shard 1: fp32, full JPEG"):
        merge_parts(plan, tmp_path / "b", encoder_name="tiny", batch_size=1, num_shards=2)
