"""Captioning speed: foodcap's batched KV-cached decoding vs ClipCap's one-image, cache-free loop, same run.

    python bench/bench_predict.py            # 32 images at batch 32; 6 through the naive loop and at batch 1
    python bench/bench_predict.py --quick    # 2 images through the naive loop and at batch 1

GPT-2 124M architecture with random weights, ClipCap's MLP mapper (prefix 10, 640-d CLIP embeddings as
RN50x4 gives), 20 new tokens per caption forced (no stop token). The naive baseline is what ClipCap's
predict does: for each image, rerun GPT-2 over the prefix and every token so far (full logits at every
position) for each new token; greedy applies its temperature/top-p filter then argmax, beam is its
generate_beam. Prints seconds per image and the speed-up of each fast setting over the naive loop, and
checks that both produce the same tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEW_TOKENS = 20
TARGETS = {("greedy", 32): 10.0, ("beam 5", 32): 6.0, ("greedy", 1): 2.0, ("beam 5", 1): 2.0}


def build(device: torch.device, prefix_length: int):
    from foodcap.language import load_language_model
    from foodcap.model import ClipCaptionModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(mapping_type="mlp", prefix_length=prefix_length, clip_dim=640, gpt2="gpt2", only_prefix=True)
    return ClipCaptionModel(config, load_language_model("gpt2", pretrained=False)).to(device).eval()


# ---------------------------------------------------------------- the naive loop (ClipCap's predict, no stop)
def naive_greedy(model, embedding: torch.Tensor, steps: int, top_p: float = 0.8) -> list[int]:
    generated = model.embed_prefix(embedding[None])  # (1, P, D)
    tokens = []
    for _ in range(steps):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :]  # full logits over every position
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[:, sorted_indices[remove]] = float("-inf")
        token = logits.argmax(-1)  # (1,)
        tokens.append(int(token))
        generated = torch.cat((generated, model.gpt.transformer.wte(token)[:, None]), dim=1)
    return tokens


def naive_beam(model, embedding: torch.Tensor, beam_size: int, steps: int) -> list[int]:
    generated = model.embed_prefix(embedding[None])  # (1, P, D)
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, device=generated.device)
    for _ in range(steps):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :].softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            seq_lengths += 1
            average = (scores[:, None] + logits) / seq_lengths[:, None]
            average, flat = average.view(-1).topk(beam_size, -1)
            source, next_tokens = flat // logits.shape[1], (flat % logits.shape[1]).unsqueeze(1)
            seq_lengths, generated = seq_lengths[source], generated[source]
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            scores = average * seq_lengths
        generated = torch.cat((generated, model.gpt.transformer.wte(next_tokens.squeeze(1))[:, None]), dim=1)
    return tokens[(scores / seq_lengths).argmax()].tolist()


# ---------------------------------------------------------------- timing
def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def fast(model, embeddings: torch.Tensor, batch_size: int, **decoding) -> list[list[int]]:
    from foodcap.decoding import generate_token_ids

    out = []
    for start in range(0, len(embeddings), batch_size):
        with torch.inference_mode():
            prefix = model.embed_prefix(embeddings[start:start + batch_size])  # (b, P, D)
        out += [s[0] for s in generate_token_ids(model, prefix, [], max_new_tokens=NEW_TOKENS, **decoding)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images (not 6) through the naive loop and at batch 1")
    p.add_argument("--device", default="auto")
    p.add_argument("--prefix_length", type=int, default=10, help="10: ClipCap's MLP; 40: the food fork's transformer")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    from foodcap.utils import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build(device, args.prefix_length)
    n_naive, n_batch = (2, 32) if args.quick else (6, 32)
    embeddings = torch.randn(n_batch, 640, generator=torch.Generator().manual_seed(1)).to(device)  # (N, 640)
    print(f"GPT-2 124M (random weights), MLP mapper prefix {args.prefix_length}, {NEW_TOKENS} new tokens, {device}, "
          f"{torch.get_num_threads()} CPU threads; naive loop and batch 1 on {n_naive} images, alternating")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other jobs share the CPU, which inflates "
              "every timing (most for many small steps, i.e. batch 1); --threads 1 suffers least")
    rows, all_same = [], True
    for name, decoding, naive in (("greedy", {}, lambda e: naive_greedy(model, e, NEW_TOKENS)),
                                  ("beam 5", {"num_beams": 5}, lambda e: naive_beam(model, e, 5, NEW_TOKENS))):
        fast(model, embeddings[:1], 1, **decoding)  # warm-up: allocator, kernels
        naive_s = single_s = 0.0
        naive_tokens, single_tokens = [], []
        for embedding in embeddings[:n_naive]:  # alternate, so load from other processes hits both alike
            with torch.inference_mode():
                seconds, tokens = timed(lambda: naive(embedding), device)
            naive_s, naive_tokens = naive_s + seconds, naive_tokens + [tokens]
            seconds, tokens = timed(lambda: fast(model, embedding[None], 1, **decoding), device)
            single_s, single_tokens = single_s + seconds, single_tokens + tokens
        batch_s, batch_tokens = timed(lambda: fast(model, embeddings, 32, **decoding), device)
        same = naive_tokens == single_tokens == batch_tokens[:n_naive]
        all_same &= same
        per_naive, per_single, per_batch = naive_s / n_naive, single_s / n_naive, batch_s / n_batch
        rows.append((name, per_naive, per_single, per_batch, same))
    print(f"\n{'decoding':<9}{'naive s/img':>13}{'batch 1 s/img':>15}{'speed-up':>10}{'batch 32 s/img':>16}{'speed-up':>10}"
          f"{'same tokens':>13}")
    for name, per_naive, per_single, per_batch, same in rows:
        print(f"{name:<9}{per_naive:>13.3f}{per_single:>15.3f}{per_naive / per_single:>9.1f}x{per_batch:>16.3f}"
              f"{per_naive / per_batch:>9.1f}x{'yes' if same else 'NO':>13}")
    print()
    met = True
    for name, per_naive, per_single, per_batch, _ in rows:
        for batch, per in ((1, per_single), (32, per_batch)):
            target = TARGETS[(name, batch)]
            ok = per_naive / per >= target
            met &= ok
            print(f"target {name} batch {batch}: >= {target:.0f}x: {'met' if ok else 'MISSED'} ({per_naive / per:.1f}x)")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
