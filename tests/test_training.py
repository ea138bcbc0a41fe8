"""Training library: labels and padding, the lean loss vs ClipCap's full-logit loss, learning, frozen GPT-2,
kill-and-resume, NaN stop, data and checkpoint errors, token cache.   pytest -x -q tests/test_training.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from foodcap.features import FeatureStore, save_features
from foodcap.language import load_language_model, load_tokenizer
from foodcap.train_data import (IGNORE_INDEX, CaptionDataset, GlobalBatchSampler, MicroBatch, TrainingDataError,
                                tokenize_captions)
from foodcap.training import CaptionLoss, TrainConfig, TrainingDiverged, effective_warmup, train

FOODS = ["soup", "salad", "cake", "pasta", "bread", "rice", "fish", "pie"]


def write_store(path: Path, *, n_images: int = 8, per_image: int = 2, dim: int = 64, seed: int = 0,
                clip_model: str | None = "tiny", split: str = "train", captions=None) -> Path:
    """A small feature store in ClipCap's pickle layout (plus meta), with captions that depend on the image."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_images, dim, generator=gen)
    records = []
    for i in range(n_images):
        for j in range(per_image):
            text = captions(i, j) if captions else f"A bowl of {FOODS[i % len(FOODS)]} on a {'red' if j else 'wooden'} table."
            records.append({"image_id": f"img{i}", "caption": text, "clip_embedding": i})
    save_features(FeatureStore(emb, records, {"clip_model": clip_model, "split": split}), path)
    return path


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    cfg = dict(data=str(tmp_path / "tiny_train.pkl"), out_dir=str(tmp_path / "out"), gpt2="tiny", epochs=2, bs=4,
               mapping_type="mlp", prefix_length=4, clip_length=4, num_layers=2, lr=1e-3, warmup_steps=0,
               save_every=0, log_every=1, seed=0)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def state_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def make_batch(store, tokenizer, indices):
    tokens = tokenize_captions([c["caption"] for c in store.captions], tokenizer, use_cache=False)
    dataset = CaptionDataset(store, tokens, max_tokens=64, filler_id=tokenizer.eos_token_id)
    return dataset, dataset[MicroBatch(tuple(indices), 0)]


def test_labels_ignore_padding_only_and_keep_token_zero(tokenizer):
    texts = ["Soup!", "A big plate of pasta with cheese and basil on a wooden table", "!"]
    store = FeatureStore(torch.randn(3, 8), [{"image_id": str(i), "caption": t, "clip_embedding": i} for i, t in enumerate(texts)])
    dataset, batch = make_batch(store, tokenizer, [0, 1, 2])
    eos = tokenizer.eos_token_id
    for row, text in enumerate(texts):
        expected = tokenizer.encode(text) + [eos]  # the caption, then end-of-text so the model learns to stop
        n = len(expected)
        assert batch["labels"][row, :n].tolist() == expected
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding never gets a real id as label
        assert dataset.tokens[row].tolist() == expected  # the cache holds unpadded tokens
    assert 0 in batch["labels"][2].tolist() and 0 in batch["labels"][0].tolist()  # "!" is token 0 and a label
    assert batch["tokens"].shape == batch["labels"].shape == (3, len(tokenizer.encode(texts[1])) + 1)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
@pytest.mark.parametrize("only_prefix", [True, False])
def test_lean_loss_equals_full_logit_clipcap_loss(tiny_model_factory, tokenizer, mapping_type, only_prefix):
    model = tiny_model_factory(mapping_type, only_prefix=only_prefix)
    texts = ["Soup!", "Pasta with cheese and basil on a plate", "A cake.", "!"]
    gen = torch.Generator().manual_seed(1)
    store = FeatureStore(torch.randn(4, 64, generator=gen),
                         [{"image_id": str(i), "caption": t, "clip_embedding": i} for i, t in enumerate(texts)])
    _, batch = make_batch(store, tokenizer, range(4))
    p = model.prefix_length
    # ClipCap's objective recomputed plainly: masked full forward, logits of every position, CE on caption tokens.
    mask = torch.cat((torch.ones(4, p), (batch["labels"] != IGNORE_INDEX).float()), dim=1)
    logits = model(batch["tokens"], batch["prefix"], mask).logits[:, p - 1:-1]  # (B, T, V)
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    trainable = [q for q in model.parameters() if q.requires_grad]
    ref_grads = torch.autograd.grad(reference, trainable)
    loss_sum, n = CaptionLoss(model)(batch["tokens"], batch["prefix"], batch["labels"])
    ours = loss_sum / n
    grads = torch.autograd.grad(ours, trainable)
    assert int(n) == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if only_prefix:
        assert not any(q.requires_grad for q in model.gpt.parameters())


class WatchFrozenGpt:
    """Callback: at every step, frozen GPT-2 must be untouched, gradient-free and without dropout."""

    def __init__(self):
        self.reference = load_language_model("tiny").state_dict()
        self.checked = 0

    def on_step_end(self, ctx):
        gpt = ctx.model.gpt
        assert not gpt.training
        for name, param in gpt.named_parameters():
            assert param.grad is None and not param.requires_grad, name
            assert torch.equal(param, self.reference[name]), name
        self.checked += 1


def test_frozen_training_learns_bang_and_leaves_gpt2_bit_identical(tmp_path, tokenizer):
    # Every caption is "!" (token 0, ClipCap's pad id): it must be learned, not ignored.
    write_store(tmp_path / "tiny_train.pkl", captions=lambda i, j: "!")
    watch = WatchFrozenGpt()
    cfg = tiny_config(tmp_path, only_prefix=True, lr=1e-2, epochs=4, no_val=True)
    best = train(cfg, callbacks=[watch])
    assert watch.checked == 16
    log = [r for r in records(Path(cfg.out_dir)) if "train_loss" in r]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0  # the loss decreases
    from foodcap.checkpoint import load_model
    from foodcap.features import load_features

    model = load_model(best)
    store = load_features(tmp_path / "tiny_train.pkl")
    with torch.no_grad():
        prefix = model.embed_prefix(store.embeddings)  # (N, P, D)
        logits = model.gpt(inputs_embeds=prefix).logits[:, -1]  # next token after the prefix
    # A frozen random tiny GPT-2 cannot become confident (its logits are small), but "!" must now be its first choice.
    assert (logits.argmax(-1) == 0).all()


class Kill:
    """Callback that dies at a given step, as a killed process would (no checkpoint written then)."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, ctx):
        if ctx.step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    write_store(tmp_path / "tiny_train.pkl")
    write_store(tmp_path / "tiny_test.pkl", n_images=2, seed=5, split="test")
    # Tuned GPT-2 with dropout: resume must restore RNG as well as model/optimizer/scheduler/step.
    common = dict(only_prefix=False, epochs=2, save_steps=2, warmup_steps=3)
    train(tiny_config(tmp_path, out_dir=str(tmp_path / "a"), **common))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, out_dir=str(tmp_path / "b"), **common), callbacks=[Kill(7)])
    state = torch.load(tmp_path / "b" / "latest" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (6, 1, 2)
    train(tiny_config(tmp_path, out_dir=str(tmp_path / "b"), resume=True, **common))
    a, b = state_of(tmp_path / "a" / "latest"), state_of(tmp_path / "b" / "latest")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a, log_b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # nothing logged twice
    assert [r.get("train_loss") for r in log_b] == [r.get("train_loss") for r in log_a]
    assert log_a[0]["lr"] == pytest.approx(1e-3 / 2)  # warm-up capped: min(3, 10% of 8 steps) = 1 step
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    write_store(tmp_path / "tiny_train.pkl")

    class Poison:
        def on_step_end(self, ctx):
            if ctx.step == 3:
                with torch.no_grad():
                    ctx.model.clip_project.model[0].weight.fill_(float("nan"))

    cfg = tiny_config(tmp_path, only_prefix=True, epochs=2, save_steps=2, no_val=True)
    with pytest.raises(TrainingDiverged, match=r"nan.*step 4.*latest"):
        train(cfg, callbacks=[Poison()])
    state = torch.load(Path(cfg.out_dir) / "latest" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state_of(Path(cfg.out_dir) / "latest").values())


@pytest.fixture
def no_model(monkeypatch):
    import foodcap.training

    def fail(*args, **kwargs):
        raise AssertionError("a model was built before the data error was reported")

    monkeypatch.setattr(foodcap.training, "build_model", fail)


def test_data_errors_come_before_any_model(tmp_path, no_model):
    empty = tmp_path / "empty_train.pkl"
    save_features(FeatureStore(torch.zeros(0, 64), [], {"clip_model": "tiny"}), empty)
    with pytest.raises(TrainingDataError, match="empty"):
        train(tiny_config(tmp_path, data=str(empty)))
    with pytest.raises(TrainingDataError, match="does not exist"):
        train(tiny_config(tmp_path, data=str(tmp_path / "missing_train.pkl")))
    write_store(tmp_path / "tiny_train.pkl", dim=64)
    write_store(tmp_path / "other.pkl", dim=32, clip_model=None)
    with pytest.raises(TrainingDataError, match=r"32-d.*64-d"):
        train(tiny_config(tmp_path, val_data=str(tmp_path / "other.pkl")))
    blank = tmp_path / "blank_train.pkl"
    write_store(blank, captions=lambda i, j: "  " if (i, j) == (3, 1) else "soup")
    with pytest.raises(TrainingDataError, match=r"captions\[7\].*no caption text"):
        train(tiny_config(tmp_path, data=str(blank)))
    vit = tmp_path / "vit_train.pkl"
    write_store(vit, dim=512, clip_model="ViT-B/32")
    with pytest.raises(TrainingDataError, match="--is_rn.*ViT-B/32"):
        train(tiny_config(tmp_path, data=str(vit), is_rn=True))


def test_init_from_clipcap_pt_and_checkpoint_dir(tmp_path, tiny_model_factory):
    from foodcap.checkpoint import CheckpointError

    write_store(tmp_path / "tiny_train.pkl")
    source = tiny_model_factory("transformer", seed=3, only_prefix=False)
    (tmp_path / "pt").mkdir()
    torch.save(source.state_dict(), tmp_path / "pt" / "clipcap.pt")  # an original ClipCap file: mapper + GPT-2
    # Architecture comes from the file; lr 0 keeps the weights, so latest/ must hold exactly the file's.
    cfg = tiny_config(tmp_path, mapping_type=None, prefix_length=None, clip_length=None, num_layers=None,
                      init_from=str(tmp_path / "pt"), lr=0.0, max_steps=1, only_prefix=True, no_val=True)
    train(cfg)
    saved = state_of(Path(cfg.out_dir) / "latest")
    # the file's GPT-2 is exactly `tiny`, the one named: frozen, it is rebuilt from the name, not re-saved
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("gpt.")}
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    assert json.loads((Path(cfg.out_dir) / "latest" / "config.json").read_text())["gpt2_config"] is None  # by name
    # Our own checkpoint directory works as a starting point as well.
    cfg2 = tiny_config(tmp_path, mapping_type=None, prefix_length=None, clip_length=None, num_layers=None,
                       init_from=str(Path(cfg.out_dir) / "latest"), lr=0.0, max_steps=1, only_prefix=True,
                       no_val=True, out_dir=str(tmp_path / "out2"))
    train(cfg2)
    assert torch.equal(state_of(Path(cfg2.out_dir) / "latest")["clip_project.prefix_const"], expected["clip_project.prefix_const"])
    with pytest.raises(CheckpointError, match=r"prefix_length: flag 6 vs checkpoint 4"):
        train(tiny_config(tmp_path, mapping_type=None, prefix_length=6, init_from=str(tmp_path / "pt" / "clipcap.pt")))
    # Shapes that differ where no flag speaks (a 32-d mapper on 64-d data) are named too.
    small = tiny_model_factory("mlp", clip_dim=32)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match=r"clip_dim: data 64 vs checkpoint 32"):
        train(tiny_config(tmp_path, init_from=str(tmp_path / "small.pt")))



def _tiny_like_gpt(**changes):
    """A GPT-2 whose tensors are `tiny`'s wherever the shapes allow, with config `changes`."""
    from foodcap.language import TINY_GPT2_CONFIG, load_language_model

    tiny = load_language_model("tiny")
    gpt = load_language_model("tiny", config={**TINY_GPT2_CONFIG, **changes})
    gpt.load_state_dict({k: v for k, v in tiny.state_dict().items() if k in gpt.state_dict()}, strict=False)
    return gpt


@pytest.mark.parametrize("case", ["identical", "fp16", "named_fp16", "extra_layer", "other_activation", "untied_head"])
def test_frozen_run_drops_the_files_gpt2_only_when_it_is_exactly_the_named_one(tmp_path, tiny_model_factory, case):
    """A frozen run from weights carrying GPT-2 saves the mapper only when that GPT-2 is exactly `--gpt2`'s."""
    from foodcap.checkpoint import save_checkpoint
    from foodcap.model import ClipCaptionModel

    write_store(tmp_path / "tiny_train.pkl")
    model = tiny_model_factory("mlp", only_prefix=False)
    if case in ("extra_layer", "other_activation"):
        changes = {"n_layer": 3} if case == "extra_layer" else {"activation_function": "relu"}
        model = ClipCaptionModel(model.config, _tiny_like_gpt(**changes))  # layers 0-1 (or all) are tiny's
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if case == "fp16":
        state = {k: v.half() if k.startswith("gpt.") else v for k, v in state.items()}
    if case == "untied_head":
        state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"] + 0.01
    if case == "other_activation":  # our own checkpoint dir records the activation in gpt2_config
        init = save_checkpoint(model, tmp_path / "init")
    else:
        init = tmp_path / "init.pt"
        torch.save(state, init)
    named = "tiny"
    if case == "named_fp16":  # --gpt2 names a local half-precision copy of the file's GPT-2
        named = str(tmp_path / "gpt2-half")
        model.gpt.half().save_pretrained(named)
    cfg = tiny_config(tmp_path, mapping_type=None, prefix_length=None, clip_length=None, num_layers=None,
                      init_from=str(init), lr=0.0, max_steps=1, only_prefix=True, no_val=True, gpt2=named)
    train(cfg)
    saved = state_of(Path(cfg.out_dir) / "latest")
    assert any(k.startswith("gpt.") for k in saved) == (case != "identical")
    recorded = json.loads((Path(cfg.out_dir) / "latest" / "config.json").read_text())["gpt2_config"]
    if case == "extra_layer":
        assert recorded["n_layer"] == 3 and "gpt.transformer.h.2.ln_1.weight" in saved
    if case == "other_activation":
        assert recorded["activation_function"] == "relu"

def test_token_cache_is_keyed_by_content(tmp_path, tokenizer):
    class CountingTokenizer:
        eos_token_id = tokenizer.eos_token_id

        def __init__(self):
            self.calls = 0

        def __call__(self, texts):
            self.calls += 1
            return tokenizer(texts)

    path = write_store(tmp_path / "c_train.pkl")
    from foodcap.features import load_features

    texts = [c["caption"] for c in load_features(path).captions]
    counting = CountingTokenizer()
    first = tokenize_captions(texts, counting, data_path=path)
    second = tokenize_captions(texts, counting, data_path=path)
    assert counting.calls == 1 and torch.equal(first.flat, second.flat)
    caches = list(tmp_path.glob("c_train_tokens-*.pt"))
    assert len(caches) == 1
    edited = texts[:-1] + ["A plate of fish."]  # same file name, different content: the cache must not be reused
    third = tokenize_captions(edited, counting, data_path=path)
    assert counting.calls == 2 and third[len(texts) - 1].tolist() == tokenizer.encode("A plate of fish.") + [tokenizer.eos_token_id]
    assert [p.name for p in tmp_path.glob("c_train_tokens-*.pt")] != [caches[0].name]

    class BiggerVocabulary(CountingTokenizer):  # e.g. a local GPT-2 with added tokens: ids may differ
        def __len__(self):
            return len(tokenizer) + 1

    bigger = BiggerVocabulary()
    tokenize_captions(texts, bigger, data_path=path)
    assert bigger.calls == 1  # the plain GPT-2 cache of the same captions was not reused


def test_global_batches_do_not_depend_on_process_count():
    lengths = torch.randint(3, 20, (23,))
    single = GlobalBatchSampler(lengths, 8, seed=1)
    shards = [list(GlobalBatchSampler(lengths, 8, num_processes=2, process_index=r, grad_accum=2, seed=1)) for r in range(2)]
    one = list(single)
    assert single.steps_per_epoch == 3  # 8 + 8 + 7 captions
    for step, batch in enumerate(one):
        parts = [mb for shard in shards for mb in shard[step * 2:(step + 1) * 2]]
        assert sorted(i for mb in parts for i in mb.indices) == sorted(batch.indices)
        assert {mb.global_tokens for mb in parts} == {batch.global_tokens} == {int(lengths[list(batch.indices)].sum())}


def test_warmup_is_capped_to_a_share_of_short_runs():
    assert effective_warmup(5000, 200_000) == 5000
    assert effective_warmup(5000, 300) == 30
    assert effective_warmup(10, 1000) == 10


def test_evaluation_hook_selects_best_and_stops_early(tmp_path):
    """The --eval_every hook: callback metrics (as validation CIDEr would be) choose best/ and drive --patience."""
    write_store(tmp_path / "tiny_train.pkl")
    scores = {2: 1.0, 4: 3.0, 6: 2.0, 8: 0.5}  # steps 4 and 8 end epochs 1 and 2 (4 steps each)

    class Score:
        def __init__(self):
            self.snapshots, self.calls = {}, []

        def _score(self, ctx, kind):
            assert not ctx.model.training  # evaluation sees no dropout
            self.calls.append((kind, ctx.step))
            self.snapshots[ctx.step] = {k: v.clone() for k, v in ctx.model.mapper_state_dict().items()}
            return {"val_score": scores[ctx.step]}

        def on_evaluate(self, ctx):
            return self._score(ctx, "evaluate")

        def on_epoch_end(self, ctx):
            return self._score(ctx, "epoch")

    score = Score()
    cfg = tiny_config(tmp_path, only_prefix=True, epochs=5, eval_every=2, best_metric="val_score", patience=1, no_val=True)
    train(cfg, callbacks=[score])
    # Epoch 1 improves (step 4's 3.0); epoch 2 does not (max 2.0): patience 1 stops after it.
    assert score.calls == [("evaluate", 2), ("epoch", 4), ("evaluate", 6), ("epoch", 8)]
    best = state_of(Path(cfg.out_dir) / "best")
    for key, value in score.snapshots[4].items():
        assert torch.equal(best[key], value), key
    assert not torch.equal(best["clip_project.model.0.weight"], state_of(Path(cfg.out_dir) / "latest")["clip_project.model.0.weight"])
    logged = [r["val_score"] for r in records(Path(cfg.out_dir)) if "val_score" in r]
    assert logged == [1.0, 3.0, 2.0, 0.5]


def test_is_rn_accepts_resnet_encoder_spellings_and_the_tiny_stand_in():
    from foodcap.features import FeatureStore
    from foodcap.train_data import check_clip_width

    def store(dim, clip_model):
        return FeatureStore(torch.zeros(2, dim), [], {"clip_model": clip_model})

    # Every spelling of a ResNet encoder agrees with --is_rn; the seeded tiny stand-in runs the seed's command.
    for name, dim in (("RN50x4", 640), ("random:RN50x4", 640), ("RN50x4:openai", 640), ("RN101", 512), ("tiny", 64)):
        assert check_clip_width(store(dim, name), "d.pkl", is_rn=True) == dim
    for name, dim in (("ViT-B/32", 512), ("random:ViT-L/14", 768)):
        with pytest.raises(TrainingDataError, match=f"--is_rn.*{name}"):
            check_clip_width(store(dim, name), "d.pkl", is_rn=True)
    # A bare weights file names no architecture: the width decides.
    assert check_clip_width(store(640, "/w/clip.pt"), "d.pkl", is_rn=True) == 640
    with pytest.raises(TrainingDataError, match="640-d.*512-d"):
        check_clip_width(store(512, "/w/clip.pt"), "d.pkl", is_rn=True)
    assert check_clip_width(store(512, "ViT-B/32"), "d.pkl", is_rn=False) == 512


def test_local_gpt2_dir_is_recorded_absolute(tmp_path, monkeypatch):
    from foodcap.checkpoint import load_model

    load_language_model("tiny").save_pretrained(tmp_path / "my_gpt2")
    write_store(tmp_path / "tiny_train.pkl")
    monkeypatch.chdir(tmp_path)
    best = train(tiny_config(tmp_path, gpt2="my_gpt2", only_prefix=True, max_steps=1, no_val=True))
    config = json.loads((Path(best) / "config.json").read_text())
    assert config["gpt2"] == str((tmp_path / "my_gpt2").resolve())  # mapper-only checkpoint: GPT-2 rebuilt from here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_model(best).config.gpt2 == config["gpt2"]
