"""Training data: a feature store checked, its captions tokenized once (cached by content), cut into global batches.

    python -c "from foodcap.train_data import load_checked_store; print(load_checked_store('RN50x4_RN_train.pkl'))"

A global batch of `bs` captions is split into `num_processes * grad_accum` micro-batches, and every micro-batch
carries the token count of its whole global batch, so the loss is normalised the same way on one process or many.
Padding is added per micro-batch (never cached): its input ids are fillers and its labels are -100.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of padding: no real token id is ever used to mean "ignore"
TOKEN_CACHE_VERSION = 1
RN_WIDTH = 640  # the reference's --is_rn meant RN50x4's 640-d embeddings


class TrainingDataError(ValueError):
    """A feature store that cannot be trained on, with the file, the field and what to do."""


def load_checked_store(path: str | os.PathLike, *, role: str = "training"):
    """load_features(path) plus the checks training needs, before any model is built."""
    from .features import load_features

    path = Path(path)
    if not path.exists():
        raise TrainingDataError(f"{role} data {path} does not exist: run `python parse_food.py ...` (foodcap extract) "
                                "first or pass --data")
    try:
        store = load_features(path)
    except TrainingDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one clear message naming the file
        raise TrainingDataError(f"{role} data {path}: cannot be read as a feature store ({type(exc).__name__}: {exc})") from exc
    emb = store.embeddings
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        shape = tuple(emb.shape) if hasattr(emb, "shape") else type(emb).__name__
        raise TrainingDataError(f"{role} data {path}: 'clip_embedding' must be an (N, D) tensor, found {shape}")
    if emb.shape[0] == 0 or not store.captions:
        raise TrainingDataError(f"{role} data {path} is empty ({emb.shape[0]} embeddings, {len(store.captions)} captions): "
                                "nothing to train on; check the extraction's log for skipped images")
    if not torch.isfinite(emb).all():
        bad = int((~torch.isfinite(emb)).any(dim=1).nonzero()[0])
        raise TrainingDataError(f"{role} data {path}: embedding row {bad} holds NaN/inf; re-extract that image")
    for i, entry in enumerate(store.captions):
        text, row = entry.get("caption"), entry.get("clip_embedding")
        if not isinstance(text, str) or not text.strip():
            raise TrainingDataError(f"{role} data {path}: captions[{i}] (image_id {entry.get('image_id')!r}) has no caption text")
        if isinstance(row, torch.Tensor) and row.numel() == 1:
            row = int(row)
        if not isinstance(row, int) or not 0 <= row < emb.shape[0]:
            raise TrainingDataError(f"{role} data {path}: captions[{i}]['clip_embedding'] = {row!r} is not a row of the "
                                    f"{emb.shape[0]}-row embedding table")
    return store


def store_clip_model(store) -> Optional[str]:
    return (store.meta or {}).get("clip_model")


def _encoder_architecture(clip_model) -> Optional[str]:
    """`random:RN50x4` / `RN50x4:openai` / `RN50x4:/w.pt` -> `RN50x4`; None when no encoder is recorded."""
    if not clip_model:
        return None
    name = str(clip_model)
    if name.startswith("random:"):
        name = name[len("random:"):]
    arch = name.partition(":")[0]
    # A bare weights file names no architecture: only the width can be checked then.
    return None if arch.lower().endswith((".pt", ".pth", ".bin", ".safetensors")) else arch


def check_clip_width(store, path, *, is_rn: bool) -> int:
    """The CLIP width comes from the data; `--is_rn` is accepted but must not contradict it."""
    width = int(store.embeddings.shape[1])
    clip_model = store_clip_model(store)
    arch = _encoder_architecture(clip_model)
    if is_rn:
        if arch == "tiny":  # the offline stand-in encoder takes the place of RN50x4 in the seed's commands
            log.info("--is_rn with %s extracted by the 'tiny' stand-in encoder: using its %d-d width", path, width)
        elif arch and not arch.upper().startswith("RN"):
            raise TrainingDataError(f"--is_rn says ResNet CLIP features, but {path} was extracted with {clip_model!r} "
                                    f"({width}-d); drop --is_rn (the width is read from the data)")
        if not arch and width != RN_WIDTH:
            raise TrainingDataError(f"--is_rn means RN50x4's {RN_WIDTH}-d features, but {path} holds {width}-d embeddings; "
                                    "drop --is_rn (the width is read from the data)")
    return width


def find_val_path(train_path: str | os.PathLike) -> Optional[Path]:
    """The held-out split extraction writes beside the train store: `*train*` -> `*val*`, else `*test*`."""
    train_path = Path(train_path)
    name = train_path.name
    pos = name.rfind("train")
    if pos < 0:
        return None
    for split in ("val", "test"):
        candidate = train_path.with_name(name[:pos] + split + name[pos + len("train"):])
        if candidate.exists():
            return candidate
    return None


# --------------------------------------------------------------------------------------------- tokens
@dataclass
class TokenizedCaptions:
    """Unpadded token ids of every caption, flat: caption i is flat[offsets[i]:offsets[i+1]]."""

    flat: torch.Tensor  # (total,) int32
    offsets: torch.Tensor  # (N + 1,) int64
    key: str

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (N,)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.flat[int(self.offsets[i]):int(self.offsets[i + 1])]


def token_cache_key(captions: Sequence[str], *, append_eos: bool, tokenizer=None) -> str:
    """Content hash of the caption texts and the vocabulary (what the tokens derive from): edits change the key."""
    digest = hashlib.sha256()
    # A tokenizer with added tokens (a local GPT-2 with its own vocabulary) must not reuse plain GPT-2's ids.
    vocab = ({"vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else None, "eos": tokenizer.eos_token_id}
             if tokenizer is not None else "gpt2-bpe")
    digest.update(json.dumps({"version": TOKEN_CACHE_VERSION, "vocab": vocab, "append_eos": append_eos}).encode())
    for text in captions:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_dirs(data_path: Path) -> list[Path]:
    return [data_path.parent, Path(os.environ.get("FOODCAP_CACHE", Path.home() / ".cache" / "foodcap")) / "tokens"]


def tokenize_captions(captions: Sequence[str], tokenizer, *, append_eos: bool = True,
                      data_path: Optional[str | os.PathLike] = None, use_cache: bool = True) -> TokenizedCaptions:
    """Tokenize every caption once; cached as `<data stem>_tokens-<hash>.pt` beside the data (else ~/.cache/foodcap)."""
    from tqdm.auto import tqdm

    key = token_cache_key(captions, append_eos=append_eos, tokenizer=tokenizer)
    cache_name = f"{Path(data_path).stem}_tokens-{key[:16]}.pt" if data_path else None
    if use_cache and cache_name:
        for folder in _cache_dirs(Path(data_path)):
            cached = folder / cache_name
            if cached.exists():
                try:
                    obj = torch.load(cached, map_location="cpu", weights_only=True)
                    if obj.get("key") == key and len(obj["offsets"]) == len(captions) + 1:
                        log.info("tokens read from cache %s", cached)
                        return TokenizedCaptions(obj["flat"], obj["offsets"], key)
                except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
                    log.warning("ignoring unreadable token cache %s (%s)", cached, exc)
    eos = tokenizer.eos_token_id
    ids: list[list[int]] = []
    chunk = 4096
    for start in tqdm(range(0, len(captions), chunk), desc="tokenizing", unit="chunk", disable=len(captions) < chunk):
        batch = tokenizer(list(captions[start:start + chunk]))["input_ids"]
        ids.extend(seq + [eos] if append_eos else seq for seq in batch)
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.int64)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.int32)
    tokens = TokenizedCaptions(flat, offsets, key)
    if use_cache and cache_name:
        _write_cache(tokens, Path(data_path), cache_name)
    return tokens


def _write_cache(tokens: TokenizedCaptions, data_path: Path, cache_name: str) -> None:
    from .utils import atomic_path

    for folder in _cache_dirs(data_path):
        try:
            with atomic_path(folder / cache_name) as tmp:
                torch.save({"key": tokens.key, "flat": tokens.flat, "offsets": tokens.offsets}, tmp)
        except OSError as exc:
            log.debug("token cache not writable in %s (%s)", folder, exc)
            continue
        # Older caches of this file hold tokens of contents that no longer exist.
        for stale in folder.glob(f"{data_path.stem}_tokens-*.pt"):
            if stale.name != cache_name:
                stale.unlink(missing_ok=True)
        log.info("tokens cached in %s", folder / cache_name)
        return


def reference_max_tokens(lengths: torch.Tensor) -> int:
    """ClipCap's cap on caption length: min(mean + 10 std, max) tokens; rare longer captions are truncated."""
    lengths = lengths.float()
    std = float(lengths.std()) if len(lengths) > 1 else 0.0
    return max(1, min(int(lengths.mean() + 10 * std), int(lengths.max())))


# --------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class MicroBatch:
    """What one process feeds the model at once, and the token count its whole global batch normalises by."""

    indices: tuple[int, ...]
    global_tokens: int


class CaptionDataset(Dataset):
    """Indexed by MicroBatch: returns the padded batch {tokens (b, T), labels (b, T), prefix (b, D), global_tokens}."""

    def __init__(self, store, tokens: TokenizedCaptions, max_tokens: int, *, filler_id: int = 50256):
        self.filler_id = filler_id  # input id behind each caption; its label is IGNORE_INDEX, never this id
        self.embeddings = store.embeddings.float()  # (N_images, D)
        self.rows = torch.tensor([int(c["clip_embedding"]) for c in store.captions], dtype=torch.int64)  # (N,)
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.lengths = tokens.lengths().clamp(max=max_tokens)  # (N,) tokens each caption contributes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: MicroBatch) -> dict:
        seqs = [self.tokens[i][: self.max_tokens].long() for i in batch.indices]
        width = max(len(s) for s in seqs)
        # Padded inputs sit after each caption, so causal attention never lets a caption position see them.
        tokens = torch.full((len(seqs), width), self.filler_id, dtype=torch.long)  # (b, T)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (b, T)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq)] = seq
            labels[row, : len(seq)] = seq
        prefix = self.embeddings[self.rows[list(batch.indices)]]  # (b, D)
        return {"tokens": tokens, "labels": labels, "prefix": prefix,
                "global_tokens": torch.tensor(batch.global_tokens, dtype=torch.long)}


def split_evenly(items: Sequence[int], parts: int) -> list[tuple[int, ...]]:
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(tuple(items[start:start + size]))
        start += size
    return out


class GlobalBatchSampler(Sampler[MicroBatch]):
    """This process's micro-batches, epoch by epoch, independent of how many processes there are.

    Epoch e shuffles with torch.Generator(seed, e); global batch k is captions [k*bs, (k+1)*bs) of that order,
    split into num_processes * grad_accum chunks; process r takes chunks r, r + P, r + 2P, ... (one per
    accumulation step). A last global batch too small to give every chunk a caption is dropped.
    """

    def __init__(self, lengths: torch.Tensor, bs: int, *, num_processes: int = 1, process_index: int = 0,
                 grad_accum: int = 1, seed: int = 0, shuffle: bool = True):
        self.lengths = lengths
        self.bs, self.num_processes, self.process_index = bs, num_processes, process_index
        self.grad_accum, self.seed, self.shuffle = grad_accum, seed, shuffle
        self.chunks = num_processes * grad_accum
        if bs < self.chunks:
            raise TrainingDataError(f"--bs {bs} is the global batch and must be at least processes x grad_accum = {self.chunks}")
        n = len(lengths)
        full, rest = divmod(n, bs)
        self.steps_per_epoch = full + (rest >= self.chunks)
        if self.steps_per_epoch == 0:
            raise TrainingDataError(f"{n} captions cannot fill one batch split over {self.chunks} micro-batches")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; `start_step` skips global batches already trained on (resume mid-epoch)."""
        self.epoch, self.start_step = epoch, start_step

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.lengths)))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.lengths), generator=gen).tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[MicroBatch]:
        order = self.order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.bs:(step + 1) * self.bs]
            global_tokens = int(self.lengths[batch].sum())
            chunks = split_evenly(batch, self.chunks)
            for micro in range(self.grad_accum):
                yield MicroBatch(chunks[micro * self.num_processes + self.process_index], global_tokens)


def eval_batches(n: int, batch_size: int, *, num_processes: int = 1, process_index: int = 0) -> list[MicroBatch]:
    """This process's share of a validation set, in fixed order (global_tokens unused: sums are reduced)."""
    mine = list(range(process_index, n, num_processes))
    return [MicroBatch(tuple(mine[i:i + batch_size]), 0) for i in range(0, len(mine), batch_size)]
