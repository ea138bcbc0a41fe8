"""`train.py` / `foodcap train` command line: the seed's command, flag compatibility, clear errors, trackers.

    pytest -x -q tests/test_train_cli.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO
from foodcap.commands.train import build_parser, main
from test_training import write_store

SEED_COMMAND = ("--only_prefix --data ./RN50x4_RN_train.pkl --out_dir ./model_checkpoints --mapping_type transformer "
                "--num_layers 8 --prefix_length 40 --prefix_length_clip 40 --is_rn").split()


def test_seed_command_runs_as_written(tmp_path):
    write_store(tmp_path / "RN50x4_RN_train.pkl", n_images=4, per_image=1, dim=640, clip_model="RN50x4")
    write_store(tmp_path / "RN50x4_RN_test.pkl", n_images=2, per_image=1, dim=640, seed=9, clip_model="RN50x4", split="test")
    env = dict(os.environ, FOODCAP_GPT2="tiny", HF_HUB_OFFLINE="1")  # the default --gpt2, offline
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *SEED_COMMAND], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "model_checkpoints"
    config = json.loads((out / "best" / "config.json").read_text())
    assert {k: config[k] for k in ("mapping_type", "prefix_length", "clip_length", "num_layers", "clip_dim", "clip_model",
                                   "only_prefix", "append_eos", "gpt2")} == dict(
        mapping_type="transformer", prefix_length=40, clip_length=40, num_layers=8, clip_dim=640, clip_model="RN50x4",
        only_prefix=True, append_eos=True, gpt2="tiny")
    assert "RN50x4_RN_test.pkl" in done.stderr  # the held-out split beside the data was found and used
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in log) == 10  # validation loss every epoch (10 epochs by default)
    assert sorted(p.name for p in out.glob("food_prefix-*")) == [f"food_prefix-{e:03d}" for e in range(10)]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train_log.csv").read_text().startswith("step,epoch,")
    # The food fork's predict default, ./model_checkpoints/best.pt, names best/; frozen GPT-2 is not re-saved.
    from foodcap.checkpoint import load_model

    model = load_model(out / "best.pt")
    assert model.config.prefix_length == 40
    weights = (out / "best" / "model.safetensors").stat().st_size
    assert weights < 20 * 2**20 and not any(k.startswith("gpt.") for k in _keys(out / "best"))


def _keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as fh:
        return list(fh.keys())


def test_every_reference_flag_is_accepted():
    args = build_parser().parse_args(
        "--data d.pkl --out_dir o --prefix p --epochs 3 --save_every 2 --prefix_length 5 --prefix_length_clip 6 --bs 7 "
        "--only_prefix --mapping_type transformer --num_layers 2 --is_rn --normalize_prefix --weights_dir w.pt".split())
    assert (args.data, args.out_dir, args.prefix, args.epochs, args.save_every, args.prefix_length, args.prefix_length_clip,
            args.bs, args.only_prefix, args.mapping_type, args.num_layers, args.is_rn, args.normalize_prefix,
            args.init_from) == ("d.pkl", "o", "p", 3, 2, 5, 6, 7, True, "transformer", 2, True, True, "w.pt")
    assert build_parser().parse_args(["--init_from", "x"]).init_from == "x"
    assert build_parser().parse_args(["--resume"]).resume is True


def test_is_rn_contradicting_the_data_is_a_clear_error(tmp_path, capsys):
    write_store(tmp_path / "ViT-B_32_train.pkl", dim=512, clip_model="ViT-B/32")
    code = main(["--data", str(tmp_path / "ViT-B_32_train.pkl"), "--out_dir", str(tmp_path / "o"), "--is_rn", "--gpt2", "tiny"])
    err = capsys.readouterr().err
    assert code == 1 and "--is_rn" in err and "ViT-B/32" in err and "drop --is_rn" in err
    # A plain ClipCap pickle records no encoder: --is_rn then means 640-d, which 512-d rows contradict.
    import pickle

    plain = tmp_path / "plain_train.pkl"
    with open(plain, "wb") as fh:
        pickle.dump({"clip_embedding": torch.randn(2, 512), "captions": [{"image_id": 0, "caption": "soup", "clip_embedding": 0}]}, fh)
    assert main(["--data", str(plain), "--is_rn", "--gpt2", "tiny", "--out_dir", str(tmp_path / "o")]) == 1
    assert "640-d" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_weights_dir_mismatch_names_the_parts(tmp_path, tiny_model_factory, capsys):
    write_store(tmp_path / "tiny_train.pkl")
    (tmp_path / "weights").mkdir()
    torch.save(tiny_model_factory("mlp").state_dict(), tmp_path / "weights" / "coco_weights.pt")
    code = main(["--data", str(tmp_path / "tiny_train.pkl"), "--gpt2", "tiny", "--out_dir", str(tmp_path / "o"),
                 "--weights_dir", str(tmp_path / "weights"), "--mapping_type", "transformer"])
    err = capsys.readouterr().err
    assert code == 1 and "coco_weights.pt" in err and "mapping_type: flag transformer vs checkpoint mlp" in err


def test_tensorboard_bf16_grad_accum_max_steps_normalize_prefix(tmp_path):
    write_store(tmp_path / "tiny_train.pkl")
    out = tmp_path / "o"
    code = main(["--data", str(tmp_path / "tiny_train.pkl"), "--gpt2", "tiny", "--out_dir", str(out), "--only_prefix",
                 "--prefix_length", "4", "--bs", "4", "--grad_accum", "2", "--mixed_precision", "bf16", "--max_steps", "2",
                 "--report_to", "tensorboard", "--save_every", "0", "--no_val", "--log_every", "1", "--cpu",
                 "--normalize_prefix"])
    assert code == 0
    assert list(out.rglob("events.out.tfevents.*"))  # Accelerate's TensorBoard tracker wrote its log
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r] == [1, 2]
    state = torch.load(out / "latest" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)  # stopped inside epoch 1
    config = json.loads((out / "latest" / "config.json").read_text())
    assert config["normalize_prefix"] is True and config["append_eos"] is True  # decoding repeats both


def test_frozen_run_from_a_clipcap_pt_saves_the_mapper_only_when_its_gpt2_is_the_named_one(tmp_path, tiny_model_factory):
    from test_checkpoint import _clipcap_state_dict

    write_store(tmp_path / "tiny_train.pkl")
    untouched = tiny_model_factory("mlp", prefix_length=4)  # its GPT-2 is exactly `tiny`, as a food-fork .pt holds gpt2
    torch.save(_clipcap_state_dict(untouched), tmp_path / "fork.pt")
    tuned = tiny_model_factory("mlp", prefix_length=4)
    with torch.no_grad():
        tuned.gpt.transformer.h[0].mlp.c_fc.bias += 0.01  # a fine-tuned GPT-2 must be kept
    torch.save(_clipcap_state_dict(tuned), tmp_path / "tuned.pt")
    for name, expect_gpt in (("fork", False), ("tuned", True)):
        out = tmp_path / name
        assert main(["--data", str(tmp_path / "tiny_train.pkl"), "--gpt2", "tiny", "--out_dir", str(out), "--only_prefix",
                     "--prefix_length", "4", "--weights_dir", str(tmp_path / f"{name}.pt"), "--max_steps", "1",
                     "--no_val", "--save_every", "0", "--cpu"]) == 0
        assert any(k.startswith("gpt.") for k in _keys(out / "best")) == expect_gpt, name
    # the mapper-only checkpoint names its GPT-2 (rebuilt from `tiny`); the tuned one records its own
    assert json.loads((tmp_path / "fork" / "best" / "config.json").read_text())["gpt2_config"] is None
    assert json.loads((tmp_path / "tuned" / "best" / "config.json").read_text())["gpt2_config"] is not None
