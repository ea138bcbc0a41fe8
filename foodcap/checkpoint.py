"""Checkpoints: our directory format (config.json + model.safetensors) and original ClipCap `.pt` files.

A frozen GPT-2 that can be rebuilt from its name (hub name, local path, seeded `tiny`) is not saved:
only the mapper weights are. Original ClipCap state dicts are read with `torch.load(weights_only=True)`
and their architecture is inferred from tensor shapes.

    python -c "from foodcap.checkpoint import load_model; print(load_model('model_checkpoints/best'))"
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .language import GPT2_HEAD_SIZE, KNOWN_GPT2, TINY_GPT2, TINY_GPT2_CONFIG, gpt2_rebuildable, load_language_model
from .model import ClipCaptionModel, ModelConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# CLIP widths of the encoders ClipCap users trained on; used only when a .pt does not say.
WIDTH_TO_ENCODER = {512: "ViT-B/32", 640: "RN50x4", 768: "ViT-L/14", 1024: "RN50x64"}
# GPT-2 by embedding width, for mapper-only state dicts (no `gpt.*` tensors to read the size from).
# Read from language.KNOWN_GPT2; the first name of each width wins (gpt2, not distilgpt2, for 768).
WIDTH_TO_GPT2: dict[int, str] = {TINY_GPT2_CONFIG["n_embd"]: TINY_GPT2}
for _name, (_width, _, _) in KNOWN_GPT2.items():
    WIDTH_TO_GPT2.setdefault(_width, _name)
# Buffers that older transformers versions stored in GPT-2 state dicts and newer ones no longer have.
_LEGACY_GPT2_BUFFERS = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used, with what was found and what was expected."""


def recover_checkpoint_dir(final: str | os.PathLike) -> Path:
    """A kill between the two renames of `_atomic_replace_dir` leaves only `<final>.old-<pid>`: put it back."""
    final = Path(final)
    if not final.exists():
        olds = sorted(final.parent.glob(final.name + ".old-*"), key=lambda p: p.stat().st_mtime)
        olds = [p for p in olds if (p / CONFIG_NAME).exists() and (p / WEIGHTS_NAME).exists()]
        if olds:
            os.replace(olds[-1], final)
            log.warning("restored %s from %s (a save was interrupted while replacing it)", final, olds[-1].name)
    return final


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model: ClipCaptionModel, directory: str | os.PathLike, *,
                    extra: Optional[dict[str, bytes]] = None) -> Path:
    """Write `directory/{config.json, model.safetensors}` atomically; `extra` adds more files (name -> bytes)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    frozen_and_rebuildable = cfg.only_prefix and cfg.gpt2_config is None and gpt2_rebuildable(cfg.gpt2)
    state = model.mapper_state_dict() if frozen_and_rebuildable else model.state_dict()
    if not frozen_and_rebuildable:
        cfg_dict = model.gpt.config.to_diff_dict()
        cfg.gpt2_config = {k: v for k, v in cfg_dict.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}
        # The LM head is tied to the token embeddings; safetensors refuses shared storage.
        state.pop("gpt.lm_head.weight", None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "gpt2_saved": str(not frozen_and_rebuildable)})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        _atomic_replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Our checkpoint dir, a ClipCap `.pt`, a folder with exactly one `.pt`, or `<dir>/best.pt` → `<dir>/best`."""
    p = Path(path)
    if p.suffix == ".pt" and not p.exists():
        recover_checkpoint_dir(p.with_suffix(""))
    recover_checkpoint_dir(p)
    if p.is_dir() and (p / CONFIG_NAME).exists():
        return p
    if p.is_file():
        return p
    if p.suffix == ".pt" and (p.with_suffix("") / CONFIG_NAME).exists():
        return p.with_suffix("")  # the food fork's `best.pt` names our `best/` directory
    if p.is_dir():
        pts = sorted(p.glob("*.pt"))
        if len(pts) == 1:
            return pts[0]
        raise CheckpointError(f"{p}: expected a foodcap checkpoint dir (with {CONFIG_NAME}) or a folder holding one .pt file; "
                              f"found {len(pts)} .pt files")
    raise CheckpointError(f"checkpoint {p} does not exist: pass a foodcap checkpoint directory or a ClipCap .pt file")


def read_clipcap_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ClipCap `.pt` without executing code, and check it is a state dict of tensors."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "not a safe state dict"
        raise CheckpointError(
            f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Expected a ClipCap checkpoint saved with torch.save(model.state_dict()); files that need arbitrary "
            "code to unpickle are refused."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: found a {type(obj).__name__}, expected a dict of tensors with keys "
                              "'clip_project.*' (and usually 'gpt.*')")
    return obj


def infer_clipcap_config(state: dict[str, torch.Tensor], *, source: str = "state dict",
                         gpt2: Optional[str] = None, clip_model: Optional[str] = None) -> ModelConfig:
    """Mapper type, prefix/clip lengths, layers, CLIP width and GPT-2 size from tensor shapes alone."""
    wte = state.get("gpt.transformer.wte.weight")
    if "clip_project.model.0.weight" in state and "clip_project.model.2.weight" in state:
        w0, w2 = state["clip_project.model.0.weight"], state["clip_project.model.2.weight"]
        clip_dim = w0.shape[1]
        d = wte.shape[1] if wte is not None else None
        if d is None:
            raise CheckpointError(f"{source}: MLP mapper without GPT-2 weights; pass --gpt2 to say which GPT-2 it was trained with")
        if w2.shape[0] % d or w0.shape[0] != (w2.shape[0] // 2) or w2.shape[1] != w0.shape[0]:
            raise CheckpointError(f"{source}: MLP mapper shapes {tuple(w0.shape)}, {tuple(w2.shape)} do not fit "
                                  f"Linear(clip, P*{d}/2) -> Linear(P*{d}/2, P*{d})")
        cfg = dict(mapping_type="mlp", prefix_length=w2.shape[0] // d, clip_length=w2.shape[0] // d, clip_dim=clip_dim)
    elif "clip_project.prefix_const" in state and "clip_project.linear.weight" in state:
        prefix_const, lin = state["clip_project.prefix_const"], state["clip_project.linear.weight"]
        d = prefix_const.shape[1]
        layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
        if lin.shape[0] % d or not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
            raise CheckpointError(f"{source}: transformer mapper shapes do not fit ClipCap's layout "
                                  f"(linear {tuple(lin.shape)}, prefix_const {tuple(prefix_const.shape)}, layers {sorted(layer_ids)})")
        cfg = dict(mapping_type="transformer", prefix_length=prefix_const.shape[0], clip_length=lin.shape[0] // d,
                   clip_dim=lin.shape[1], num_layers=len(layer_ids))
    else:
        found = sorted({".".join(k.split(".")[:3]) for k in state})[:8]
        raise CheckpointError(f"{source}: no ClipCap mapper found (keys start {found}); expected "
                              "'clip_project.model.0/2.*' (MLP) or 'clip_project.linear/prefix_const/transformer.*' (transformer)")
    if wte is not None:
        n_layer = len({k.split(".")[3] for k in state if k.startswith("gpt.transformer.h.")})
        wpe = state["gpt.transformer.wpe.weight"]
        gpt_cfg = dict(vocab_size=wte.shape[0], n_embd=wte.shape[1], n_layer=n_layer, n_head=wte.shape[1] // GPT2_HEAD_SIZE,
                       n_positions=wpe.shape[0])
        cfg.update(gpt2=gpt2 or "gpt2", gpt2_config=gpt_cfg, only_prefix=False)
    else:
        if gpt2 is None:  # only the transformer mapper gets here (the MLP needs `gpt.*` to tell its width)
            gpt2 = WIDTH_TO_GPT2.get(d)
            if gpt2 is None:
                raise CheckpointError(f"{source}: mapper-only state dict for a {d}-d GPT-2, which is no known size "
                                      f"({sorted(WIDTH_TO_GPT2)}); pass --gpt2 with the GPT-2 it was trained with")
        cfg.update(gpt2=gpt2 or "gpt2", only_prefix=True)
    cfg.update(clip_model=clip_model or WIDTH_TO_ENCODER.get(cfg["clip_dim"]), append_eos=False, stop_token=".")
    return ModelConfig(**cfg)


def _load_strict(model: ClipCaptionModel, state: dict[str, torch.Tensor], source: str, *, mapper_only: bool) -> None:
    expected = model.mapper_state_dict() if mapper_only else model.state_dict()
    state = {k: v for k, v in state.items() if not _LEGACY_GPT2_BUFFERS.match(k) or k in expected}
    if not mapper_only and "gpt.lm_head.weight" not in state and "gpt.transformer.wte.weight" in state:
        state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for name, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        shapes = "".join(f"\n  {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5])
        raise CheckpointError(f"{source}: weights do not fit the model ({detail}){shapes}")
    model.load_state_dict(state, strict=False)


def load_model(path: str | os.PathLike, *, gpt2: Optional[str] = None, clip_model: Optional[str] = None,
               device: str | torch.device = "cpu") -> ClipCaptionModel:
    """One loader for our checkpoint dirs and original ClipCap `.pt` files (strict: every weight must fit)."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    if path.is_dir():
        try:
            cfg = ModelConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / CONFIG_NAME}: not a foodcap model config ({exc})") from exc
        if clip_model:
            cfg.clip_model = clip_model
        try:
            state = load_file(str(path / WEIGHTS_NAME))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path / WEIGHTS_NAME}: unreadable safetensors file ({exc}); re-save the checkpoint") from exc
        mapper_only = not any(k.startswith("gpt.") for k in state)
        if mapper_only:
            gpt = load_language_model(gpt2 or cfg.gpt2)
        else:
            gpt = load_language_model(cfg.gpt2, config=cfg.gpt2_config)
        model = ClipCaptionModel(cfg, gpt)
        _load_strict(model, state, str(path), mapper_only=mapper_only)
    else:
        state = read_clipcap_state_dict(path)
        cfg = infer_clipcap_config(state, source=str(path), gpt2=gpt2, clip_model=clip_model)
        mapper_only = cfg.gpt2_config is None
        gpt = load_language_model(cfg.gpt2) if mapper_only else load_language_model(cfg.gpt2, config=cfg.gpt2_config)
        model = ClipCaptionModel(cfg, gpt)
        _load_strict(model, state, str(path), mapper_only=mapper_only)
        log.info("loaded ClipCap checkpoint %s: %s mapper, prefix %d, CLIP width %d (%s)", path, cfg.mapping_type,
                 cfg.prefix_length, cfg.clip_dim, cfg.clip_model)
    return model.to(device).eval()
