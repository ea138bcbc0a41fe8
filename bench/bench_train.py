"""Training throughput of foodcap's CaptionLoss step vs a naive ClipCap-style step, same batch, same run.

    python bench/bench_train.py            # full: both configurations, GPT-2 124M (random weights)
    python bench/bench_train.py --quick    # smaller batch, fewer steps
    python bench/bench_train.py --reference_padding   # also the naive step with ClipCap's padding

Configurations (issue 4): the seed's (transformer mapper, prefix 40, clip length 40, 8 layers, 640-d CLIP,
GPT-2 frozen) and MLP + tuned GPT-2 (prefix 10, 512-d CLIP). The naive baseline does what ClipCap's train.py
does: captions padded with token 0 plus an attention mask, full logits over every position, cross entropy with
ignore_index=0, (frozen case) GPT-2 parameters left requiring gradients with only the mapper in the optimizer, and
a plain (unfused) AdamW. Ours is train.py's step: foodcap.training.CaptionLoss (LM head on caption positions only,
no gradients for frozen weights) and its fused AdamW. Both get the same captions (a seeded sample of the real
Kaggle food captions in tests/data/Captions.csv) padded to the same width, the batch's longest caption; with
--reference_padding the naive step is also timed on captions padded as ClipCap pads them, every caption to the
dataset's max_seq_len (min(mean + 10 std, max) tokens: 153 here). Timing alternates the steps and
reports the median step; peak memory is measured per step in a fresh process (CPU: peak RSS growth over the
RSS before the step, GPU: torch.cuda peak allocation over the allocation before it).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "seed (transformer, frozen GPT-2)": dict(mapping_type="transformer", prefix_length=40, clip_length=40, num_layers=8,
                                             clip_dim=640, only_prefix=True),
    "mlp + tuned GPT-2": dict(mapping_type="mlp", prefix_length=10, clip_length=10, clip_dim=512, only_prefix=False),
}


def build(name: str, device: torch.device):
    from foodcap.language import load_language_model
    from foodcap.model import ClipCaptionModel, ModelConfig

    torch.manual_seed(0)
    gpt = load_language_model("gpt2", pretrained=False)  # GPT-2 124M architecture, random weights
    model = ClipCaptionModel(ModelConfig(gpt2="gpt2", **CONFIGS[name]), gpt).to(device)
    model.train()
    return model


def food_captions() -> list[str]:
    with open(REPO / "tests" / "data" / "Captions.csv", newline="", encoding="utf-8") as fh:
        return [row["Captions"] for row in csv.DictReader(fh) if row.get("Captions", "").strip()]


def reference_max_len() -> int:
    """The width ClipCap's dataset pads every caption to: min(mean + 10 std, max) tokens over the caption file."""
    from foodcap.language import load_tokenizer

    tok = load_tokenizer("gpt2")
    lengths = torch.tensor([len(tok.encode(c)) for c in food_captions()], dtype=torch.float)
    return min(int(lengths.mean() + 10 * lengths.std()), int(lengths.max()))


def make_batch(bs: int, clip_dim: int, device: torch.device, width: int | None = None) -> dict:
    """`bs` real food captions drawn with a fixed seed (+ EOS), right-padded to the longest (or `width`)."""
    from foodcap.language import load_tokenizer

    captions = random.Random(0).sample(food_captions(), bs)
    tok = load_tokenizer("gpt2")
    seqs = [(tok.encode(c) + [tok.eos_token_id])[: width or None] for c in captions]
    width = width or max(len(s) for s in seqs)
    tokens = torch.zeros(bs, width, dtype=torch.long)
    labels = torch.full((bs, width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
    gen = torch.Generator().manual_seed(0)
    return {"tokens": tokens.to(device), "labels": labels.to(device),
            "prefix": torch.randn(bs, clip_dim, generator=gen).to(device), "lengths": [len(s) for s in seqs]}


class Naive:
    """ClipCap's reference step: pad 0 + mask, full logits, ignore_index=0, GPT-2 weights requiring grad."""

    def __init__(self, model):
        self.model = model
        if model.config.only_prefix:
            model.gpt.requires_grad_(True)  # ClipCapPrefix only hides GPT-2 from the optimizer
        params = model.clip_project.parameters() if model.config.only_prefix else model.parameters()
        self.opt = torch.optim.AdamW(params, lr=2e-5)

    def step(self, batch: dict) -> float:
        model, p = self.model, self.model.prefix_length
        tokens = batch["tokens"]
        mask = torch.cat((torch.ones(tokens.shape[0], p, device=tokens.device), (batch["labels"] != -100).float()), 1)
        logits = model(tokens, batch["prefix"], mask).logits[:, p - 1:-1]  # (B, T, V) from (B, P+T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        model.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


class Ours:
    def __init__(self, model):
        from foodcap.training import CaptionLoss, make_optimizer

        self.loss = CaptionLoss(model)
        self.opt = make_optimizer([q for q in model.parameters() if q.requires_grad], 2e-5)  # what train.py uses
        self.autocast = model.gpt.device.type == "cuda"

    def step(self, batch: dict) -> float:
        with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss_sum, n = self.loss(batch["tokens"], batch["prefix"], batch["labels"])
        loss = loss_sum / n
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_memory(name: str, variant: str, bs: int, device: torch.device) -> float:
    """Peak memory one step adds on top of the built model, in MiB (run in a fresh process)."""
    model = build(name, device)
    batch = make_batch(bs, model.config.clip_dim, device)
    runner = (Naive if variant == "naive" else Ours)(model)
    runner.step(batch)  # first step allocates optimizer state; the second shows the steady-state peak
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.step(batch)
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _rss_kib("VmRSS")
    runner.step(batch)
    return (_rss_kib("VmHWM") - base) / 1024


def bench_config(name: str, bs: int, steps: int, device: torch.device, reference_width: int | None = None) -> dict:
    """Samples/s of each variant: the median of `steps` alternating timed steps after one warm-up step each."""
    torch.manual_seed(0)
    model_naive, model_ours = build(name, device), build(name, device)
    batch = make_batch(bs, model_naive.config.clip_dim, device)
    runners = {"naive": (Naive(model_naive), batch), "ours": (Ours(model_ours), batch)}
    if reference_width:  # the reference as it really runs: every caption padded to the dataset's max_seq_len
        runners["naive, reference padding"] = (runners["naive"][0], make_batch(bs, model_naive.config.clip_dim, device,
                                                                            width=reference_width))
    for runner, data in runners.values():
        runner.step(data)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(steps):
        for label, (runner, data) in runners.items():
            _sync(device)
            start = time.perf_counter()
            runner.step(data)
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return {k: bs / statistics.median(v) for k, v in times.items()}  # the median step resists a busy machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 timed steps")
    parser.add_argument("--bs", type=int, default=None, help="batch size (default 16, quick 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4, quick 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reference_padding", action="store_true",
                        help="also time the naive step on captions padded as ClipCap pads them (to the dataset's max_seq_len)")
    parser.add_argument("--memory_only", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from foodcap.utils import resolve_device

    device = resolve_device(args.device)
    bs = args.bs or (8 if args.quick else 16)
    steps = args.steps or (2 if args.quick else 4)
    if args.memory_only:
        print(json.dumps({"peak_mib": measure_memory(args.memory_only[0], args.memory_only[1], bs, device)}))
        return 0
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {bs}, {steps} timed steps each")
    reference_width = reference_max_len() if args.reference_padding else None
    if reference_width:
        print(f"reference padding: every caption to {reference_width} tokens (ClipCap's max_seq_len for Captions.csv)")
    for name in CONFIGS:
        rates = bench_config(name, bs, steps, device, reference_width)
        memory = {}
        for variant in ("naive", "ours"):
            # Fixed glibc thresholds: big tensors are mmapped and unmapped when freed, so RSS follows live memory.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, __file__, "--memory_only", name, variant, "--bs", str(bs),
                                  "--device", str(device)], capture_output=True, text=True, check=True, env=env)
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"{name}: naive {rates['naive']:.2f} samples/s, ours {rates['ours']:.2f} samples/s "
              f"-> {rates['ours'] / rates['naive']:.2f}x; peak step memory naive {memory['naive']:.0f} MiB, "
              f"ours {memory['ours']:.0f} MiB")
        if reference_width:
            ref = rates["naive, reference padding"]
            print(f"  naive with reference padding {ref:.2f} samples/s -> ours {rates['ours'] / ref:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
