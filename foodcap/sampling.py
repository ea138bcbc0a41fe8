"""Next-token choice for batched decoding: repetition controls, temperature, top-k / nucleus sampling.

Every function works on a batch of rows of logits (R, V) and never loops over rows, so one call serves
all images and all their samples at once. Sampling draws come from per-sample random streams keyed by
(seed, sample index) only, so an image gets the same caption alone or inside any batch.

    python -c "import torch; from foodcap.sampling import sample_tokens; print(sample_tokens(torch.randn(2, 9), torch.rand(2)))"
"""
from __future__ import annotations

from typing import Optional

import torch

# Mixes (seed, sample index) into one generator seed; any odd constant well above realistic indices works.
_SAMPLE_SEED_STRIDE = 1_000_003


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers applies it): tokens already generated become less likely.

    logits (R, V), history (R, T) token ids generated so far. A positive logit is divided by `penalty`,
    a negative one multiplied, so the token always loses probability when penalty > 1.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)  # (R, T)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def ban_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in that row's history.

    logits (R, V), history (R, T). The last n-1 generated tokens are compared with every earlier
    (n-1)-gram at once; the tokens that followed a match get -inf.
    """
    n = ngram_size
    rows, length = history.shape
    if n <= 0 or length < n:
        return logits
    if n == 1:
        banned_rows = torch.arange(rows, device=history.device).repeat_interleave(length)
        logits = logits.clone()
        logits[banned_rows, history.reshape(-1)] = float("-inf")
        return logits
    ngrams = history.unfold(1, n, 1)  # (R, T-n+1, n): every n-gram generated so far
    current = history[:, length - n + 1:]  # (R, n-1): the n-gram being started now
    matches = (ngrams[:, :, :-1] == current[:, None, :]).all(-1)  # (R, T-n+1)
    row_ids, gram_ids = matches.nonzero(as_tuple=True)
    if row_ids.numel() == 0:
        return logits
    logits = logits.clone()
    logits[row_ids, ngrams[row_ids, gram_ids, -1]] = float("-inf")
    return logits


def process_logits(logits: torch.Tensor, history: torch.Tensor, *, repetition_penalty: float = 1.0,
                   no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """The repetition controls, applied to raw logits before temperature (transformers' order)."""
    logits = apply_repetition_penalty(logits, history, repetition_penalty)
    return ban_repeated_ngrams(logits, history, no_repeat_ngram_size)


def nucleus_mask(sorted_probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Which of the descending-sorted probabilities (R, V) stay in the sampling support.

    top-k keeps the k most likely tokens; top-p keeps the smallest prefix whose mass reaches p (the
    token that crosses p is kept, as in ClipCap and transformers). The most likely token always stays.
    """
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k and top_k > 0:
        keep[:, top_k:] = False
    if top_p is not None and top_p < 1.0:
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (R, V): mass of the tokens ranked above
        keep &= mass_before < top_p
    keep[:, 0] = True
    return keep


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to its top-k / top-p support.

    logits (R, V); uniforms (R,) in [0, 1): each row's draw, turned into a token by the inverse CDF of
    its (renormalised) support, so the choice is a pure function of the logits and the draw.
    """
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}; use greedy decoding for argmax")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_probs * nucleus_mask(sorted_probs, top_k, top_p)
    cdf = sorted_probs.cumsum(-1)  # (R, V)
    threshold = uniforms.to(cdf) * cdf[:, -1]
    picks = (cdf <= threshold[:, None]).sum(-1)  # (R,) first sorted position whose CDF passes the draw
    last_allowed = (sorted_probs > 0).sum(-1) - 1  # never step onto a zero-probability token
    picks = torch.minimum(picks, last_allowed.clamp_min(0))
    return order.gather(1, picks[:, None]).squeeze(1)


def sample_uniforms(seed: Optional[int], num_samples: int, steps: int) -> torch.Tensor:
    """(num_samples, steps) uniform draws; stream j depends only on (seed, j). seed=None: fresh randomness."""
    draws = []
    for sample_index in range(num_samples):
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed((seed * _SAMPLE_SEED_STRIDE + sample_index) % (2**63))
        draws.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(draws)
