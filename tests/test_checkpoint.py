"""Checkpoints: our directory format round-trips exactly; original ClipCap .pt files load strictly and safely."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import foodcap
from foodcap.checkpoint import CheckpointError, infer_clipcap_config, load_model, save_checkpoint


def _logits(model, tokens, prefix):
    with torch.no_grad():
        return model(tokens, prefix).logits


def _clipcap_state_dict(model) -> dict:
    """What ClipCap's torch.save(model.state_dict()) held: gpt.* (with the attention buffers older
    transformers versions stored) and clip_project.*."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_pos = model.gpt.config.n_positions
    for i in range(model.gpt.config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


@pytest.mark.parametrize("mapping_type,prefix,clip_len,layers", [("mlp", 6, 6, 8), ("transformer", 5, 3, 2)])
def test_original_clipcap_pt_loads_and_reproduces_logits(tmp_path, tiny_model_factory, mapping_type, prefix, clip_len, layers):
    model = tiny_model_factory(mapping_type, prefix_length=prefix, clip_length=clip_len, num_layers=layers,
                               only_prefix=False, seed=3)
    # Perturb GPT-2 so the test proves its weights come from the file, not from the seeded tiny config.
    with torch.no_grad():
        model.gpt.transformer.h[0].mlp.c_fc.weight.add_(0.5)
    pt = tmp_path / "coco_weights.pt"
    torch.save(_clipcap_state_dict(model), pt)

    captioner = foodcap.load_captioner(pt, device="cpu")
    cfg = captioner.model.config
    assert (cfg.mapping_type, cfg.prefix_length, cfg.clip_dim) == (mapping_type, prefix, 64)
    if mapping_type == "transformer":
        assert (cfg.clip_length, cfg.num_layers) == (clip_len, layers)
    assert cfg.gpt2_config["n_embd"] == 128 and cfg.gpt2_config["n_layer"] == 2 and cfg.gpt2_config["n_head"] == 2
    assert cfg.stop_token == "." and cfg.append_eos is False  # reference checkpoints stop at "."
    tokens, x = torch.randint(0, 50257, (2, 5)), torch.randn(2, 64)
    torch.testing.assert_close(_logits(captioner.model, tokens, x), _logits(model.eval(), tokens, x), rtol=0, atol=0)


def test_clip_encoder_is_guessed_from_width_unless_given():
    state = {"clip_project.model.0.weight": torch.zeros(5 * 128 // 2, 640), "clip_project.model.0.bias": torch.zeros(320),
             "clip_project.model.2.weight": torch.zeros(5 * 128, 320), "clip_project.model.2.bias": torch.zeros(640),
             "gpt.transformer.wte.weight": torch.zeros(50257, 128), "gpt.transformer.wpe.weight": torch.zeros(256, 128),
             "gpt.transformer.h.0.ln_1.weight": torch.zeros(128)}
    assert infer_clipcap_config(state).clip_model == "RN50x4"
    assert infer_clipcap_config(state, clip_model="RN50").clip_model == "RN50"
    state["clip_project.model.2.weight"] = torch.zeros(5 * 128 + 1, 320)
    with pytest.raises(CheckpointError, match="MLP mapper shapes"):
        infer_clipcap_config(state)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
@pytest.mark.parametrize("only_prefix", [True, False])
def test_our_checkpoint_round_trip_is_exact(tmp_path, tiny_model_factory, mapping_type, only_prefix):
    model = tiny_model_factory(mapping_type, only_prefix=only_prefix, normalize_prefix=True, seed=5)
    if not only_prefix:
        with torch.no_grad():
            model.gpt.transformer.wte.weight.mul_(1.5)  # tuned GPT-2 weights must come back from the file
    out = save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["mapping_type"] == mapping_type and config["only_prefix"] == only_prefix
    stored = load_file(str(out / "model.safetensors"))
    has_gpt = any(k.startswith("gpt.") for k in stored)
    assert has_gpt is (not only_prefix)  # frozen GPT-2 is rebuilt from its name, never re-saved
    loaded = load_model(out)
    tokens, x = torch.randint(0, 50257, (2, 6)), torch.randn(2, 64)
    torch.testing.assert_close(_logits(loaded, tokens, x), _logits(model.eval(), tokens, x), rtol=0, atol=0)
    assert loaded.config.normalize_prefix is True


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path, tiny_model_factory):
    a, b = tiny_model_factory("mlp", seed=1), tiny_model_factory("mlp", seed=2)
    save_checkpoint(a, tmp_path / "best")
    save_checkpoint(b, tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp or old directories left
    x = torch.randn(1, 64)
    torch.testing.assert_close(load_model(tmp_path / "best").embed_prefix(x), b.embed_prefix(x))
    # The food fork's default `--load_pt ./model_checkpoints/best.pt` names our best/ directory.
    torch.testing.assert_close(load_model(tmp_path / "best.pt").embed_prefix(x), b.embed_prefix(x))


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="weights.pt: not a loadable PyTorch state dict"):
        load_model(bad)


def test_non_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="found a list, expected a dict of tensors"):
        load_model(path)


def test_wrong_shapes_are_named(tmp_path, tiny_model_factory):
    model = tiny_model_factory("transformer", prefix_length=4, clip_length=4, num_layers=2, only_prefix=False)
    state = _clipcap_state_dict(model)
    state["clip_project.transformer.layers.1.mlp.fc1.weight"] = torch.zeros(7, 128)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"wrong shape.*layers\.1\.mlp\.fc1\.weight"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no ClipCap mapper found"):
        torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
        load_model(tmp_path / "other.pt")


class _Exploit:
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('pwned')" % str(_Exploit.target),))


def test_malicious_pickle_does_not_run(tmp_path):
    _Exploit.target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"clip_project.model.0.weight": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not _Exploit.target.exists()


def test_missing_checkpoint_and_ambiguous_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "a.pt").write_bytes(b"x")
    (tmp_path / "b.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="found 2 .pt files"):
        load_model(tmp_path)


def test_device_auto_never_hardcodes_cuda():
    from foodcap.utils import resolve_device

    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_mapper_only_clipcap_pt_reads_the_gpt2_size_from_the_width(tmp_path, tiny_model_factory):
    model = tiny_model_factory("transformer", prefix_length=5, clip_length=3, seed=4)
    mapper_only = {k: v for k, v in model.state_dict().items() if not k.startswith("gpt.")}
    # The transformer mapper's width names the GPT-2 size: 128 is the seeded tiny one, 1024 gpt2-medium.
    assert infer_clipcap_config(mapper_only).gpt2 == "tiny"
    pt = tmp_path / "transformer_weights.pt"
    torch.save(mapper_only, pt)
    loaded = foodcap.load_captioner(pt, device="cpu").model
    tokens, x = torch.randint(0, 50257, (2, 5)), torch.randn(2, 64)
    torch.testing.assert_close(_logits(loaded, tokens, x), _logits(model, tokens, x), rtol=0, atol=0)
    wide = {"clip_project.prefix_const": torch.zeros(5, 1024), "clip_project.linear.weight": torch.zeros(3 * 1024, 640),
            "clip_project.transformer.layers.0.norm1.weight": torch.zeros(1024)}
    assert infer_clipcap_config(wide).gpt2 == "gpt2-medium"
    assert infer_clipcap_config(wide, gpt2="/models/my-gpt2").gpt2 == "/models/my-gpt2"
    wide["clip_project.prefix_const"] = torch.zeros(5, 96)
    wide["clip_project.linear.weight"] = torch.zeros(3 * 96, 640)
    with pytest.raises(CheckpointError, match="96-d GPT-2.*--gpt2"):
        infer_clipcap_config(wide)


def test_save_killed_between_renames_is_recovered(tmp_path, tiny_model_factory):
    from foodcap.checkpoint import save_checkpoint

    model = tiny_model_factory("mlp", seed=5)
    save_checkpoint(model, tmp_path / "best")
    # What a kill between `best -> best.old-<pid>` and `tmp -> best` leaves behind.
    os.replace(tmp_path / "best", tmp_path / "best.old-123")
    loaded = load_model(tmp_path / "best.pt")  # the food fork's name for best/
    assert (tmp_path / "best" / "config.json").exists() and not (tmp_path / "best.old-123").exists()
    tokens, x = torch.randint(0, 50257, (2, 5)), torch.randn(2, 64)
    torch.testing.assert_close(_logits(loaded, tokens, x), _logits(model, tokens, x), rtol=0, atol=0)


def test_incomplete_config_is_an_error_naming_the_file(tmp_path, tiny_model_factory):
    out = save_checkpoint(tiny_model_factory("mlp"), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    del config["prefix_length"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ckpt/config.json: not a foodcap model config .*prefix_length"):
        load_model(out)
