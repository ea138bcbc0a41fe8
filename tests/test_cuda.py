"""The CUDA paths: fp16/bf16 extraction, mixed-precision training, decoding. Skipped without a GPU.

    pytest -q tests/test_cuda.py        # or bench/gpu_check.sh, which also runs the benchmarks on the GPU
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from foodcap.encoders import load_encoder  # noqa: E402

from test_extract_cli import _run, coco_like  # noqa: E402,F401 - fixture
from test_training import tiny_config, write_store  # noqa: E402


def _pixels(encoder, n: int = 4) -> torch.Tensor:
    size = encoder.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_resnet_encoder_on_cuda_matches_fp32_on_cpu(precision):
    gpu = load_encoder("random:RN50", device="cuda", precision=precision)
    cpu = load_encoder("random:RN50", device="cpu", precision="fp32")
    pixels = _pixels(gpu)
    on_gpu, on_cpu = gpu.encode_images(pixels), cpu.encode_images(pixels)
    assert on_gpu.dtype == torch.float32 and on_gpu.device.type == "cuda" and torch.isfinite(on_gpu).all()
    assert torch.nn.functional.cosine_similarity(on_gpu.cpu(), on_cpu).min() > 0.999
    one_at_a_time = torch.cat([gpu.encode_images(pixels[i:i + 1]) for i in range(len(pixels))])
    assert torch.allclose(on_gpu, one_at_a_time, atol=1e-2 * float(on_gpu.abs().max()))


def test_extraction_cli_on_cuda_with_workers(coco_like, tmp_path):  # noqa: F811
    from foodcap.commands.extract import main
    from foodcap.features import load_features

    out = tmp_path / "out"
    assert main(["--clip_model_type", "tiny", "--data_path", str(coco_like), "--out_dir", str(out), "--device", "cuda",
                 "--num_workers", "2", "--batch_size", "4", "--test_size", "0"]) == 0
    gpu = load_features(out / "tiny_RN_train.pkl")
    assert gpu.meta["clip_precision"] == "fp16" and gpu.num_images == 10
    cpu = _run(coco_like, tmp_path / "cpu", "--test_size", "0", "--precision", "fp32")["train"]
    assert torch.nn.functional.cosine_similarity(gpu.embeddings, cpu.embeddings).min() > 0.999


@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_training_on_cuda_with_mixed_precision(tmp_path, mixed_precision):
    from foodcap.training import train

    write_store(tmp_path / "tiny_train.pkl")
    torch.cuda.reset_peak_memory_stats()
    best = train(tiny_config(tmp_path, mixed_precision=mixed_precision, max_steps=6, no_val=True))
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU, not quietly on the CPU
    log = [json.loads(line) for line in (Path(best).parent / "train_log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_decoding_on_cuda_agrees_with_cpu(tiny_model_factory, tmp_path):
    from foodcap.captioner import load_captioner
    from foodcap.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tiny_model_factory("transformer"), tmp_path / "ckpt")
    prefixes = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))  # (B, D)
    cpu = load_captioner(checkpoint, device="cpu")
    gpu = load_captioner(checkpoint, device="cuda")
    with torch.inference_mode():
        logits_cpu = cpu.model(torch.zeros(6, 3, dtype=torch.long), prefixes).logits
        logits_gpu = gpu.model(torch.zeros(6, 3, dtype=torch.long, device="cuda"), prefixes.cuda()).logits
    assert torch.allclose(logits_gpu.float().cpu(), logits_cpu, atol=1e-3, rtol=1e-3)
    default = gpu.caption_embeddings(prefixes, max_new_tokens=8)  # the autocast precision users get
    assert len(default) == 6 and all(isinstance(c, str) for c in default)
    for options in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        captions = gpu.caption_embeddings(prefixes, precision="fp32", **options)
        assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
        # batched equals one at a time on the GPU, as on the CPU
        assert captions == [gpu.caption_embeddings(prefixes[i:i + 1], precision="fp32", **options)[0]
                            for i in range(6)]
