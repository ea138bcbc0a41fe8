"""Batched, KV-cached beam search that ranks hypotheses exactly as ClipCap's `generate_beam` does.

ClipCap's rules, kept because published checkpoints were tuned under them:
- log-probabilities are `softmax(logits / temperature).log()` (temperature <= 0 means 1);
- a hypothesis' score is the sum of its token log-probabilities, and candidates are ranked by that sum
  divided by the number of tokens generated, at every step, over all beams x vocabulary of one image;
- a finished beam stays in the race with its score frozen (its only continuation adds nothing);
- the search for an image ends when all its beams have finished or after `max_new_tokens` tokens;
  hypotheses are returned best first by score / length.
Here every image and every live beam moves in one forward pass per step, finished beams leave the KV
cache, and images whose beams have all finished leave the batch.

    python -c "from foodcap.beam import beam_search; help(beam_search)"
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .stepper import CachedLM

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (R, V), history (R, T)) -> logits


def _log_probs(logits: torch.Tensor, temperature: float, history: torch.Tensor,
               process: Optional[LogitsProcessor]) -> torch.Tensor:
    if process is not None:
        logits = process(logits, history)
    # softmax().log() rather than log_softmax: ClipCap's exact numbers, including its underflow to -inf
    # at low temperatures, which decides which hypotheses survive.
    return (logits / temperature).softmax(-1).log()


def beam_search(lm: CachedLM, prefix_embeds: torch.Tensor, *, beam_size: int, stop_ids: torch.Tensor,
                max_new_tokens: int, temperature: float = 1.0, num_return_sequences: int = 1,
                process: Optional[LogitsProcessor] = None) -> list[list[list[int]]]:
    """Beam-search captions for a batch of prefixes (B, P, D).

    Returns, per image, `num_return_sequences` token-id lists, best first; each ends with its stop token
    when it has one. `stop_ids` (S,) holds the ids that finish a hypothesis.
    """
    if num_return_sequences > beam_size:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed the beam size ({beam_size})")
    temperature = temperature if temperature > 0 else 1.0
    num_images, beams, device = prefix_embeds.shape[0], beam_size, lm.device
    stop_ids = stop_ids.to(device)
    results: list[Optional[list[list[int]]]] = [None] * num_images

    logits = lm.start(prefix_embeds)  # (B, V)
    vocab = logits.shape[-1]
    empty = torch.zeros(num_images, 0, dtype=torch.long, device=device)
    scores, first = _log_probs(logits, temperature, empty, process).topk(beams, dim=-1)  # (B, K)
    tokens = torch.zeros(num_images, beams, max_new_tokens, dtype=torch.long, device=device)  # (B, K, L)
    tokens[:, :, 0] = first
    seq_lengths = torch.ones(num_images, beams, device=device)  # (B, K), float as in ClipCap
    stopped = torch.isin(first, stop_ids)  # (B, K)
    image_ids = torch.arange(num_images, device=device)  # original index of each image still searched
    source_rows = image_ids[:, None].expand(-1, beams)  # (B, K): cache row holding each beam's past

    def retire(done: torch.Tensor) -> None:
        """Record the finished images' hypotheses, best first by score / length, as ClipCap orders them."""
        final = scores[done] / seq_lengths[done]  # (b, K)
        order = final.argsort(dim=-1, descending=True)[:, :num_return_sequences]
        done_tokens, done_lengths = tokens[done].tolist(), seq_lengths[done].long().tolist()
        for row, (image, ranks) in enumerate(zip(image_ids[done].tolist(), order.tolist())):
            results[image] = [done_tokens[row][k][:done_lengths[row][k]] for k in ranks]

    for step in range(1, max_new_tokens):
        done = stopped.all(dim=1)  # (B,)
        if done.any():
            retire(done)
            keep = ~done
            tokens, scores, seq_lengths, stopped = tokens[keep], scores[keep], seq_lengths[keep], stopped[keep]
            image_ids, source_rows = image_ids[keep], source_rows[keep]
            if image_ids.numel() == 0:
                break
        live = ~stopped  # (B, K): only these beams need GPT-2; finished ones cost nothing from here on
        lm.select(source_rows[live])
        live_logits = lm.step(tokens[:, :, step - 1][live])  # (L, V)
        live_log_probs = _log_probs(live_logits, temperature, tokens[live][:, :step], process)

        b = image_ids.numel()
        log_probs = torch.full((b * beams, vocab), float("-inf"), device=device)  # (B*K, V)
        log_probs[live.view(-1)] = live_log_probs
        log_probs[stopped.view(-1), 0] = 0.0  # a finished beam's one continuation keeps its score
        scores_sum = scores.view(-1, 1) + log_probs  # (B*K, V)
        seq_lengths = seq_lengths + live  # finished beams stop growing
        average = (scores_sum / seq_lengths.view(-1, 1)).view(b, beams * vocab)  # (B, K*V)
        best_average, flat = average.topk(beams, dim=-1)  # (B, K)
        source_beam, next_tokens = flat // vocab, flat % vocab  # (B, K)

        # Cache row of every live beam after this step: live beams were fed in row-major order.
        live_row = (live.view(-1).cumsum(0) - 1).view(b, beams)
        source_rows = live_row.gather(1, source_beam)
        seq_lengths = seq_lengths.gather(1, source_beam)
        tokens = tokens.gather(1, source_beam[:, :, None].expand(-1, -1, max_new_tokens)).clone()
        tokens[:, :, step] = next_tokens
        scores = best_average * seq_lengths
        stopped = stopped.gather(1, source_beam) | torch.isin(next_tokens, stop_ids)

    if image_ids.numel():
        retire(torch.ones_like(image_ids, dtype=torch.bool))
    return results  # type: ignore[return-value]
