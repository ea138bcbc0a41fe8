"""GPT-2 run one token at a time over a batch of rows with its KV cache (the engine under decoding).

All rows share one length (every prefix has `prefix_length` positions and rows advance in lockstep), so
no padding or attention mask is needed: finished rows are dropped from the cache instead, and beam
search reorders or duplicates rows with the same `select` call.

    python -c "from foodcap.stepper import CachedLM; help(CachedLM)"
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Optional

import torch


@functools.lru_cache(maxsize=None)
def _forward_keywords(model_class: type) -> tuple[str, Optional[str]]:
    """The cache keyword (`cache` in transformers >= 5.2x, `past_key_values` before) and the logits-slicing one."""
    params = inspect.signature(model_class.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache_kw, keep_kw


def autocast_context(device: torch.device, precision: str = "auto"):
    """fp16/bf16 autocast on CUDA (`auto`: bf16 where supported, else fp16); float32 elsewhere."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class CachedLM:
    """A causal LM (GPT2LMHeadModel) stepped with its KV cache; logits come back as float32 (R, V)."""

    def __init__(self, lm: torch.nn.Module, precision: str = "auto"):
        self.lm = lm
        self.device = next(lm.parameters()).device
        self.precision = precision
        self.cache: Any = None
        self._cache_kw, self._keep_kw = _forward_keywords(type(lm))

    def _run(self, **inputs: Any) -> torch.Tensor:
        if self._keep_kw:
            inputs[self._keep_kw] = 1  # only the last position's logits: the LM head is the costliest layer
        with autocast_context(self.device, self.precision):
            out = self.lm(use_cache=True, **{self._cache_kw: self.cache}, **inputs)
        cache = out.get("cache")
        self.cache = cache if cache is not None else out.get("past_key_values")
        return out.logits[:, -1].float()  # (R, V)

    def start(self, prefix_embeds: torch.Tensor) -> torch.Tensor:
        """Run the prefix embeddings (B, P, D) once; returns the logits for the first caption token (B, V)."""
        self.cache = None
        return self._run(inputs_embeds=prefix_embeds.to(self.device))

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per cached row (R,); returns the next-token logits (R, V)."""
        return self._run(input_ids=token_ids.to(self.device).view(-1, 1))

    def select(self, rows: torch.Tensor) -> None:
        """Keep, reorder or duplicate cache rows: row i of the new cache is old row rows[i]."""
        rows = rows.to(self.device)
        if self.cache is None:
            return
        if hasattr(self.cache, "reorder_cache"):  # transformers Cache objects (DynamicCache and friends)
            self.cache.reorder_cache(rows)
        else:  # legacy tuple of (key, value) per layer, each (R, H, T, Dh)
            self.cache = tuple(tuple(t.index_select(0, rows) for t in layer) for layer in self.cache)
