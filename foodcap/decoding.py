"""Captions from CLIP embeddings or images: greedy, seeded sampling and ClipCap beam search, batched and KV-cached.

Decoding options use transformers' GenerationConfig names (num_beams, do_sample, temperature, top_p,
top_k, max_new_tokens, num_return_sequences, no_repeat_ngram_size, repetition_penalty) plus `stop_token`,
`seed` and `precision`. Defaults give greedy decoding, which equals ClipCap's non-beam path.

    python -c "import foodcap; c = foodcap.load_captioner('model_checkpoints/best'); print(c.caption('Images/inf1.jpg', num_beams=5))"
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from .beam import beam_search
from .sampling import process_logits, sample_tokens, sample_uniforms
from .stepper import CachedLM

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 67  # ClipCap's entry_length
DEFAULT_TOP_P = 0.8  # the nucleus the reference's sampling code used
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class DecodingOptions:
    """Validated decoding settings; build with `DecodingOptions.from_kwargs(**decoding)`."""

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0  # sampling: softmax(logits / T); beam: ClipCap's scaling (<= 0 means 1); greedy: unused
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0  # 0 = no top-k limit
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    stop_token: Optional[str] = None  # None: EOS for checkpoints trained with it, else the checkpoint's text token (".")
    seed: Optional[int] = 0  # sampling only; None draws fresh randomness
    precision: str = "auto"  # CUDA autocast: auto (bf16 where supported, else fp16), fp16, bf16, fp32

    @classmethod
    def from_kwargs(cls, **decoding: Any) -> "DecodingOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(decoding) - known)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; expected some of {sorted(known)}")
        options = cls(**{k: v for k, v in decoding.items() if v is not None or k in ("stop_token", "seed")})
        options.validate()
        return options

    @property
    def sampling(self) -> bool:
        """Sampling at temperature 0 is argmax, the limit it approaches."""
        return self.do_sample and self.temperature > 0

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(int(self.num_beams) == self.num_beams and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        need(not (self.do_sample and self.num_beams > 1), "beam search does not sample: use num_beams > 1 or do_sample=True, not both")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        need(self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(self.stop_token is None or self.stop_token != "", "stop_token must not be empty")
        if self.num_beams > 1:
            need(self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        elif not self.sampling:
            need(self.num_return_sequences == 1, "greedy decoding gives one caption per image; use do_sample=True "
                                                 "or num_beams > 1 for several")

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def stop_token_ids(tokenizer, config, stop_token: Optional[str] = None) -> list[int]:
    """Token ids that end a caption.

    Checkpoints trained with an end-of-text token (config.append_eos) stop at GPT-2's EOS; reference
    ClipCap checkpoints stop at their text token (config.stop_token, "."). `stop_token` replaces the text
    token; EOS stays a stop for checkpoints that learned it. As in ClipCap, a text stop token is its
    first BPE token.
    """
    ids: list[int] = []
    text = stop_token if stop_token is not None else (None if config.append_eos else (config.stop_token or "."))
    if text is not None:
        encoded = tokenizer.encode(text)
        if not encoded:
            raise ValueError(f"stop token {text!r} encodes to no GPT-2 token")
        if len(encoded) > 1:
            log.warning("stop token %r is %d GPT-2 tokens; stopping at its first, %r, as ClipCap does",
                        text, len(encoded), tokenizer.decode(encoded[:1]))
        ids.append(int(encoded[0]))
    if config.append_eos and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def tokens_to_text(tokenizer, token_ids: Sequence[int]) -> str:
    """Caption text: a final EOS is not text and is dropped; a text stop token such as "." stays."""
    token_ids = list(token_ids)
    if token_ids and token_ids[-1] == tokenizer.eos_token_id:
        token_ids = token_ids[:-1]
    return tokenizer.decode(token_ids).strip()


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()  # dropout off, as ClipCap's generators set
    try:
        yield
    finally:
        module.train(was_training)


def generate_token_ids(model: torch.nn.Module, prefix_embeds: torch.Tensor, stop_ids: Iterable[int], *,
                       options: Optional[DecodingOptions] = None, **decoding: Any) -> list[list[list[int]]]:
    """The core: GPT-2 input prefixes (B, P, D) -> per image, `num_return_sequences` token-id lists.

    `model` is a ClipCaptionModel or a bare GPT-2 LM head model. Sequences include their stop token when
    they reached one and hold at most `max_new_tokens` tokens. Works without a Captioner or tokenizer.
    Pass decoding kwargs, or `options` already validated.
    """
    if options is None:
        options = DecodingOptions.from_kwargs(**decoding)
    elif decoding:
        raise TypeError("pass either options= or decoding kwargs, not both")
    lm = getattr(model, "gpt", model)
    positions = getattr(getattr(lm, "config", None), "n_positions", None)
    if positions is not None and prefix_embeds.shape[1] + options.max_new_tokens > positions:
        raise ValueError(f"prefix ({prefix_embeds.shape[1]}) + max_new_tokens ({options.max_new_tokens}) exceeds "
                         f"GPT-2's {positions} positions; lower max_new_tokens")
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    process = None
    if options.repetition_penalty != 1.0 or options.no_repeat_ngram_size > 0:
        process = functools.partial(process_logits, repetition_penalty=options.repetition_penalty,
                                    no_repeat_ngram_size=options.no_repeat_ngram_size)
    with torch.inference_mode(), _eval_mode(lm):
        stepper = CachedLM(lm, options.precision)
        if options.num_beams > 1:
            return beam_search(stepper, prefix_embeds, beam_size=options.num_beams, stop_ids=stop,
                               max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                               num_return_sequences=options.num_return_sequences, process=process)
        return _greedy_or_sample(stepper, prefix_embeds, stop, options, process)


def _greedy_or_sample(lm: CachedLM, prefix_embeds: torch.Tensor, stop_ids: torch.Tensor, options: DecodingOptions,
                      process) -> list[list[list[int]]]:
    """Argmax (ClipCap's non-beam path) or sampling, all rows in lockstep; finished rows leave the batch."""
    num_images, samples, steps = prefix_embeds.shape[0], options.num_return_sequences, options.max_new_tokens
    device = lm.device
    stop_ids = stop_ids.to(device)
    logits = lm.start(prefix_embeds)  # (B, V): the prefix runs once per image, however many samples
    if samples > 1:
        per_row_image = torch.arange(num_images, device=device).repeat_interleave(samples)
        lm.select(per_row_image)
        logits = logits[per_row_image]  # (B*S, V), rows image-major
    rows = num_images * samples
    uniforms = None
    if options.sampling:  # (B*S, L): row (image, j) uses stream j, whatever else is in the batch
        streams = sample_uniforms(options.seed, samples, steps).float()  # float32 before moving: MPS has no float64
        uniforms = streams.repeat(num_images, 1).to(device)
    history = torch.zeros(rows, steps, dtype=torch.long, device=device)  # (R, L)
    lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # rows still generating, in cache order
    for step in range(steps):
        if process is not None:
            logits = process(logits, history[alive, :step])
        if uniforms is not None:
            next_tokens = sample_tokens(logits, uniforms[alive, step], temperature=options.temperature,
                                        top_k=options.top_k, top_p=options.top_p)
        else:
            next_tokens = logits.argmax(dim=-1)  # temperature and top-p never change the argmax
        history[alive, step] = next_tokens
        finished = torch.isin(next_tokens, stop_ids)
        if step == steps - 1:
            break
        if finished.any():
            lengths[alive[finished]] = step + 1
            keep = (~finished).nonzero().squeeze(1)
            alive, next_tokens = alive[keep], next_tokens[keep]
            if alive.numel() == 0:
                break
            lm.select(keep)
        logits = lm.step(next_tokens)
    history, lengths = history.tolist(), lengths.tolist()
    return [[history[r][:lengths[r]] for r in range(i * samples, (i + 1) * samples)] for i in range(num_images)]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def caption_embeddings(captioner, embeddings: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE,
                       progress: bool = False, **decoding: Any) -> list:
    """(N, D) CLIP image embeddings -> one caption per row (a list of captions per row with num_return_sequences > 1)."""
    options = DecodingOptions.from_kwargs(**decoding)
    model = captioner.model
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim == 1:
        embeddings = embeddings[None]
    if embeddings.ndim != 2 or embeddings.shape[1] != model.config.clip_dim:
        raise ValueError(f"expected CLIP embeddings of shape (N, {model.config.clip_dim}) for this checkpoint, "
                         f"got {tuple(embeddings.shape)}; were they made with another encoder?")
    stop = stop_token_ids(captioner.tokenizer, model.config, options.stop_token)
    device = next(model.parameters()).device
    captions: list[list[str]] = []
    chunks = list(_chunks(len(embeddings), max(1, batch_size)))
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="captioning", unit="batch")
    for chunk in chunks:
        with torch.inference_mode(), _eval_mode(model):
            prefix = model.embed_prefix(embeddings[chunk].to(device))  # (b, P, D_gpt)
        for sequences in generate_token_ids(model, prefix, stop, options=options):
            captions.append([tokens_to_text(captioner.tokenizer, ids) for ids in sequences])
    return [c[0] for c in captions] if options.num_return_sequences == 1 else captions


def encode_pil_images(encoder, images: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """RGB PIL images -> (N, D) CLIP embeddings, in batches."""
    parts = [encoder.encode_images(torch.stack([encoder.preprocess(im) for im in images[chunk]]))
             for chunk in _chunks(len(images), max(1, batch_size))]
    return torch.cat(parts) if parts else torch.zeros(0, encoder.embed_dim)


def caption_images(captioner, images: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                   fast_jpeg: bool = True, **decoding: Any):
    """Image paths / bytes / PIL images -> one caption each (a list each with num_return_sequences > 1).

    fast_jpeg: JPEG files (paths, bytes, streams) decode at the smallest DCT scale keeping twice CLIP's input
    size, as extraction does; PIL images passed in are used as they are.

    A single image gives a single result. A bad image raises foodcap.images.BadImageError naming it;
    the CLI instead skips and reports bad files.
    """
    from PIL import Image

    from .images import load_image

    single = isinstance(images, (str, bytes, Image.Image)) or hasattr(images, "__fspath__") or hasattr(images, "read")
    items = [images] if single else list(images)
    DecodingOptions.from_kwargs(**decoding)  # fail on bad options before any image is read
    encoder = captioner.encoder  # checks the encoder width against the checkpoint first
    results: list = []
    for chunk in _chunks(len(items), max(1, batch_size)):
        min_side = encoder.jpeg_min_side(fast_jpeg)
        embeddings = encode_pil_images(encoder, [load_image(item, min_side=min_side) for item in items[chunk]],
                                       batch_size)
        results += caption_embeddings(captioner, embeddings, batch_size=batch_size, progress=False, **decoding)
    return results[0] if single else results
