"""Data-parallel training: two CPU processes (torchrun, gloo) give one process's weights for the same global batch.

    pytest -x -q tests/test_train_distributed.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO
from foodcap.training import TrainConfig, train
from test_training import state_of, write_store

ARGS = dict(gpt2="tiny", only_prefix=True, mapping_type="transformer", prefix_length=4, clip_length=4, num_layers=2,
            bs=8, epochs=2, lr=1e-3, warmup_steps=2, seed=3, save_every=0, log_every=1)


def cli_args(cfg: dict) -> list[str]:
    out = []
    for key, value in cfg.items():
        flag = "--prefix_length_clip" if key == "clip_length" else f"--{key}"
        out += [flag] if value is True else [flag, str(value)]
    return out


def test_two_processes_match_one_process(tmp_path):
    # 20 captions of 2 to 24 tokens (global batches 8, 8, 4): micro-batches hold very different token counts, so
    # only a loss normalised by the global batch's tokens makes the split irrelevant.
    write_store(tmp_path / "tiny_train.pkl", n_images=10, per_image=2,
                captions=lambda i, j: " ".join(["soup and rice"] * (1 + (3 * i + 5 * j) % 8)))
    write_store(tmp_path / "tiny_test.pkl", n_images=3, seed=4, split="test")  # 6 captions, split unevenly
    train(TrainConfig(data=str(tmp_path / "tiny_train.pkl"), out_dir=str(tmp_path / "one"), **ARGS))
    # Two processes, each also accumulating two micro-batches: four pieces of every global batch of 8.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"),
               "--data", str(tmp_path / "tiny_train.pkl"), "--out_dir", str(tmp_path / "two"), "--grad_accum", "2", "--cpu",
               *cli_args(ARGS)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es) x 2 accumulation" in done.stderr
    one, two = state_of(tmp_path / "one" / "latest"), state_of(tmp_path / "two" / "latest")
    assert one.keys() == two.keys()
    # Adam turns float noise in near-zero gradients into steps of up to lr (1e-3) on a few elements, so the weights
    # are compared at 1e-4; a different split of the objective moves many weights by ~lr.
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=key)
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()] for run in ("one", "two")]
    for field in ("train_loss", "val_loss"):
        a = [r[field] for r in logs[0] if field in r]
        b = [r[field] for r in logs[1] if field in r]
        assert len(a) == len(b) > 1
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    train_losses = [r["train_loss"] for r in logs[0] if "train_loss" in r]
    assert train_losses[-1] < train_losses[0]  # the compared weights did move
