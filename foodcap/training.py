"""Training entry point: TrainConfig -> checked data -> model (fresh, --init_from or --resume) -> the loop.

    python -c "from foodcap.training import TrainConfig, train; train(TrainConfig(data='RN50x4_RN_train.pkl', gpt2='tiny'))"

Everything that can be wrong with the data is reported before a model is built. Architecture flags left unset
are taken from the --init_from / --resume checkpoint, else ClipCap's defaults; a set flag that contradicts the
checkpoint is an error naming the parts. The loop itself is in foodcap.train_loop.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, infer_clipcap_config, read_clipcap_state_dict,
                         recover_checkpoint_dir, resolve_checkpoint)
from .model import ClipCaptionModel, ModelConfig
from .train_data import (IGNORE_INDEX, TrainingDataError, check_clip_width, find_val_path, load_checked_store, reference_max_tokens,
                         store_clip_model, tokenize_captions)

log = logging.getLogger(__name__)

# ClipCap's defaults for the architecture flags (used when neither a flag nor a checkpoint says otherwise).
ARCH_DEFAULTS = dict(mapping_type="mlp", prefix_length=10, clip_length=10, num_layers=8, normalize_prefix=False)


def default_gpt2() -> str:
    """--gpt2 when neither the flag nor a checkpoint names one: FOODCAP_GPT2 (e.g. `tiny` for offline runs), else gpt2."""
    return os.environ.get("FOODCAP_GPT2") or "gpt2"


WARMUP_SHARE = 0.1  # --warmup_steps is capped to this share of the run's optimizer steps


@dataclass
class TrainConfig:
    data: str = "./RN50x4_RN_train.pkl"
    out_dir: str = "./model_checkpoints"
    prefix: str = "food_prefix"  # file name prefix of the per-epoch checkpoints <prefix>-<epoch>/
    epochs: int = 10
    save_every: int = 1  # epochs between <prefix>-<epoch>/ checkpoints (0: none; best/ and latest/ are always kept)
    prefix_length: Optional[int] = None
    clip_length: Optional[int] = None  # --prefix_length_clip
    bs: int = 40  # the GLOBAL batch: per process per micro-step = bs / (processes * grad_accum)
    only_prefix: bool = False
    mapping_type: Optional[str] = None
    num_layers: Optional[int] = None
    is_rn: bool = False
    normalize_prefix: Optional[bool] = None
    init_from: Optional[str] = None  # --weights_dir: a ClipCap .pt, a folder with one .pt, or our checkpoint dir
    lr: float = 2e-5
    warmup_steps: int = 5000
    gpt2: Optional[str] = None
    val_data: Optional[str] = None  # None: the val/test split beside --data, if extraction wrote one
    no_val: bool = False
    seed: int = 42
    grad_accum: int = 1
    mixed_precision: str = "no"
    max_steps: Optional[int] = None
    num_workers: int = 0
    resume: bool | str = False  # True: <out_dir>/latest; a path: that checkpoint dir
    patience: int = 0  # epochs without improvement before stopping (0: never stop early)
    report_to: str = "none"  # tensorboard | wandb | none
    log_every: int = 10
    save_steps: int = 1000  # optimizer steps between latest/ saves inside an epoch (0: epoch ends only)
    max_caption_tokens: Optional[int] = None  # None: ClipCap's min(mean + 10 std, max)
    cpu: bool = False
    best_metric: str = "val_loss"  # or a metric a callback returns (e.g. "val_cider"); "loss" in the name: lower is better
    eval_every: int = 0  # steps between callbacks' on_evaluate (the evaluation issue's validation CIDEr)

    def to_dict(self) -> dict:
        return asdict(self)


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """--warmup_steps, but never more than WARMUP_SHARE of the run (ClipCap's 5000 would swallow a short run)."""
    return max(0, min(warmup_steps, math.ceil(WARMUP_SHARE * total_steps)))


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """ClipCap's AdamW (no weight decay), fused where PyTorch has it: ~4x faster updates of a 57M-weight mapper on CPU."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CaptionLoss(nn.Module):
    """ClipCap's objective, computed lean: (sum of caption-token cross-entropies, caption-token count).

    GPT-2's body runs on [prefix embeddings; caption tokens but the last]; the LM head runs only on the
    positions that predict a real caption token (position P-1+j predicts token j). Equal to cross entropy of
    the full logits over caption tokens, without the (B, P+T, V) tensor.
    """

    def __init__(self, model: ClipCaptionModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gpt = self.model.gpt
        text = gpt.get_input_embeddings()(tokens[:, :-1])  # (B, T-1, D)
        prefix_embeds = self.model.embed_prefix(prefix).to(text.dtype)  # (B, P, D)
        inputs = torch.cat((prefix_embeds, text), dim=1)  # (B, P+T-1, D)
        hidden = gpt.transformer(inputs_embeds=inputs, use_cache=False).last_hidden_state  # (B, P+T-1, D)
        hidden = hidden[:, self.model.prefix_length - 1:]  # (B, T, D)
        keep = labels != IGNORE_INDEX  # (B, T)
        logits = gpt.lm_head(hidden[keep])  # (N_tokens, V)
        loss_sum = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return loss_sum, keep.sum()


@dataclass
class PreparedData:
    train_store: Any
    train_path: Path
    train_tokens: Any
    val_store: Any = None
    val_path: Optional[Path] = None
    val_tokens: Any = None
    max_tokens: int = 0
    clip_dim: int = 0
    clip_model: Optional[str] = None


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Load and check train (and validation) stores, tokenize once; every data error surfaces here."""
    train_path = Path(cfg.data)
    train = load_checked_store(train_path)
    clip_dim = check_clip_width(train, train_path, is_rn=cfg.is_rn)
    val_path = None
    if not cfg.no_val:
        val_path = Path(cfg.val_data) if cfg.val_data else find_val_path(train_path)
    val = None
    if val_path is not None:
        val = load_checked_store(val_path, role="validation")
        if val.embeddings.shape[1] != clip_dim:
            raise TrainingDataError(f"validation data {val_path} holds {val.embeddings.shape[1]}-d embeddings but "
                                    f"{train_path} holds {clip_dim}-d: both must come from the same CLIP encoder")
        tm, vm = store_clip_model(train), store_clip_model(val)
        if tm and vm and tm != vm:
            raise TrainingDataError(f"validation data {val_path} was extracted with {vm!r}, {train_path} with {tm!r}")
        log.info("validation data: %s (%d captions)", val_path, len(val.captions))
    else:
        log.warning("no validation data (pass --val_data, or extract a test split beside %s): best/ is chosen by "
                    "the epoch's mean training loss", train_path)
    train_tokens = tokenize_captions([c["caption"] for c in train.captions], tokenizer, data_path=train_path)
    val_tokens = (tokenize_captions([c["caption"] for c in val.captions], tokenizer, data_path=val_path)
                  if val is not None else None)
    max_tokens = cfg.max_caption_tokens or reference_max_tokens(train_tokens.lengths())
    return PreparedData(train, train_path, train_tokens, val, val_path, val_tokens, max_tokens, clip_dim,
                        store_clip_model(train))


# --------------------------------------------------------------------------------------------- model
def read_init_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """A ClipCap .pt (file or folder with one) or our checkpoint dir -> (its config, its tensors, its name)."""
    from safetensors.torch import load_file

    resolved = resolve_checkpoint(path)
    if resolved.is_dir():
        try:
            cfg = ModelConfig.from_dict(json.loads((resolved / CONFIG_NAME).read_text()))
            return cfg, load_file(str(resolved / WEIGHTS_NAME)), str(resolved)
        except Exception as exc:  # noqa: BLE001 - unreadable JSON, unknown fields, a damaged safetensors file
            raise CheckpointError(f"{resolved}: not a usable foodcap checkpoint ({type(exc).__name__}: {exc})") from exc
    state = read_clipcap_state_dict(resolved)
    return infer_clipcap_config(state, source=str(resolved)), state, str(resolved)


def resolve_model_config(cfg: TrainConfig, data: PreparedData, init: Optional[ModelConfig], source: str = "") -> ModelConfig:
    """Flags > checkpoint > ClipCap defaults; a flag contradicting the checkpoint is an error naming the parts."""
    requested = dict(mapping_type=cfg.mapping_type, prefix_length=cfg.prefix_length, clip_length=cfg.clip_length,
                     num_layers=cfg.num_layers, normalize_prefix=cfg.normalize_prefix)
    mapper = cfg.mapping_type or (init.mapping_type if init is not None else ARCH_DEFAULTS["mapping_type"])
    resolved: dict[str, Any] = {}
    clashes = []
    for name, value in requested.items():
        from_init = getattr(init, name) if init is not None else None
        # normalize_prefix changes no shape; an MLP mapper has no clip_length / num_layers.
        shapes_matter = name != "normalize_prefix" and (mapper == "transformer" or name not in ("clip_length", "num_layers"))
        if init is not None and value is not None and value != from_init and shapes_matter:
            clashes.append(f"{name}: flag {value} vs checkpoint {from_init}")
        resolved[name] = value if value is not None else (from_init if from_init is not None else ARCH_DEFAULTS[name])
    if init is not None and init.clip_dim != data.clip_dim:
        clashes.append(f"clip_dim: data {data.clip_dim} vs checkpoint {init.clip_dim}")
    if clashes:
        raise CheckpointError(f"{source}: the checkpoint does not fit the requested model ({'; '.join(clashes)}); "
                              "drop the contradicting flags or start from a matching checkpoint")
    gpt2 = cfg.gpt2 or (init.gpt2 if init is not None else None) or default_gpt2()
    if Path(gpt2).is_dir():  # a local GPT-2: recorded absolute, so the checkpoint loads from any working directory
        gpt2 = str(Path(gpt2).resolve())
    return ModelConfig(**resolved, clip_dim=data.clip_dim, clip_model=data.clip_model or (init.clip_model if init else None),
                       gpt2=gpt2, only_prefix=cfg.only_prefix, append_eos=True, stop_token=None)


def build_model(mcfg: ModelConfig, init_state: Optional[dict[str, torch.Tensor]] = None, init_cfg: Optional[ModelConfig] = None,
                source: str = "") -> ClipCaptionModel:
    """GPT-2 by name (pretrained) or, when the init weights carry GPT-2, from their config; then a strict load."""
    from .checkpoint import _load_strict
    from .language import load_language_model

    carries_gpt = init_state is not None and any(k.startswith("gpt.") for k in init_state)
    gpt = None
    if carries_gpt and mcfg.only_prefix:
        # ClipCap and food-fork .pt files hold all of GPT-2, usually the untouched pretrained one. When it is exactly
        # the GPT-2 named, a frozen run rebuilds it from the name and its checkpoints hold the mapper only.
        gpt = _named_gpt_if_identical(init_state, mcfg.gpt2, init_cfg.gpt2_config if init_cfg is not None else None)
        if gpt is not None:
            init_state = {k: v for k, v in init_state.items() if not k.startswith("gpt.")}
            carries_gpt = False
            log.info("the GPT-2 inside %s is exactly %s: checkpoints will store the mapper only", source, mcfg.gpt2)
    if carries_gpt:
        gpt_config = init_cfg.gpt2_config if init_cfg is not None and init_cfg.gpt2_config else None
        gpt = load_language_model(mcfg.gpt2, config=gpt_config) if gpt_config else load_language_model(mcfg.gpt2)
        # GPT-2 weights that came from a file cannot be rebuilt from a name: checkpoints must store them.
        mcfg.gpt2_config = gpt_config or {k: v for k, v in gpt.config.to_diff_dict().items()
                                          if not k.startswith("_") and k not in ("transformers_version", "architectures")}
    elif gpt is None:
        gpt = load_language_model(mcfg.gpt2)
    model = ClipCaptionModel(mcfg, gpt)
    if init_state is not None:
        _load_strict(model, init_state, source, mapper_only=not carries_gpt)
        log.info("initialised from %s (%s)", source, "mapper + GPT-2" if carries_gpt else "mapper")
    return model


# GPT2Config fields that change what a frozen GPT-2 computes (dropouts do not: it runs in eval mode)
_GPT2_FUNCTION_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                         "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                         "reorder_and_upcast_attn", "tie_word_embeddings")
_LEGACY_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # saved by old transformers versions, never weights


def _named_gpt_if_identical(init_state: dict[str, torch.Tensor], name: Optional[str], recorded: Optional[dict]):
    """The GPT-2 called `name` when the `gpt.*` tensors of `init_state` are exactly it, else None.

    Exactly: same configuration (`recorded`, the config the initial weights came with, against the named one, on
    every field that changes the function), the same set of tensors (no layer more or less), the same dtypes and
    values, and an LM head tied to the token embeddings. The named model is only looked for locally (`tiny`, a
    folder, the Hugging Face cache): nothing is downloaded just to compare.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from .language import TINY_GPT2, gpt2_config, load_language_model

    if not name:
        return None
    try:
        named_cfg = gpt2_config(TINY_GPT2) if name == TINY_GPT2 else GPT2Config.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    if recorded:
        theirs, ours = GPT2Config(**recorded).to_dict(), named_cfg.to_dict()
        if any(theirs.get(k) != ours.get(k) for k in _GPT2_FUNCTION_FIELDS):
            return None
    file_gpt = {k[len("gpt."):]: v for k, v in init_state.items()
                if k.startswith("gpt.") and not k.endswith(_LEGACY_GPT2_BUFFERS)}
    head = file_gpt.pop("lm_head.weight", None)
    try:
        gpt = load_language_model(name) if name == TINY_GPT2 else GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        log.info("no local copy of %s to compare with the initial weights (%s); keeping their GPT-2", name, exc)
        return None
    named = {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    if file_gpt.keys() != named.keys():
        return None
    for key, weight in named.items():
        theirs = file_gpt[key]
        if theirs.dtype != weight.dtype or theirs.shape != weight.shape or not torch.equal(theirs, weight):
            return None
    if head is not None and not torch.equal(head, file_gpt["transformer.wte.weight"]):
        return None  # an untied head: not the named (tied) GPT-2
    return gpt


def latest_dir(cfg: TrainConfig) -> Path:
    if isinstance(cfg.resume, str) and cfg.resume not in ("", "latest"):
        return Path(cfg.resume)
    return Path(cfg.out_dir) / "latest"


def train(cfg: TrainConfig, *, callbacks: Sequence[Any] = ()) -> Path:
    """Train; returns the best checkpoint directory (<out_dir>/best)."""
    from .language import load_tokenizer
    from .train_loop import Trainer

    if cfg.bs < 1 or cfg.grad_accum < 1 or cfg.epochs < 1:
        raise ValueError(f"--bs ({cfg.bs}), --grad_accum ({cfg.grad_accum}) and --epochs ({cfg.epochs}) must be positive")
    tracker_module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.report_to or "none")
    if tracker_module:
        import importlib.util

        if importlib.util.find_spec(tracker_module) is None and not (tracker_module == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise ValueError(f"--report_to {cfg.report_to} needs the {tracker_module} package: `pip install {tracker_module}` "
                             "(or --report_to none; train_log.csv/jsonl and loss_curve.png are written anyway)")
    tokenizer = load_tokenizer(cfg.gpt2 or default_gpt2())
    data = prepare_data(cfg, tokenizer)
    resume_from = recover_checkpoint_dir(latest_dir(cfg)) if cfg.resume else None
    if resume_from is not None and not (resume_from / CONFIG_NAME).exists():
        if isinstance(cfg.resume, str) and cfg.resume not in ("", "latest"):
            raise CheckpointError(f"--resume {resume_from}: no checkpoint there (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        log.info("--resume: no checkpoint in %s yet, starting from scratch", resume_from)
        resume_from = None
    if resume_from is not None:
        init_cfg, init_state, source = read_init_weights(resume_from)
    elif cfg.init_from:
        init_cfg, init_state, source = read_init_weights(cfg.init_from)
    else:
        init_cfg, init_state, source = None, None, ""
    mcfg = resolve_model_config(cfg, data, init_cfg, source)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the mapper's initial weights: identical in every process
    model = build_model(mcfg, init_state, init_cfg, source)
    del init_state
    trainer = Trainer(cfg, model, tokenizer, data, callbacks=callbacks, resume_from=resume_from)
    return trainer.fit()
