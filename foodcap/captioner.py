"""The public inference object: a ClipCap model, its tokenizer and (lazily) its CLIP image encoder.

    python -c "import foodcap; c = foodcap.load_captioner('model_checkpoints/best'); print(c.caption(['Images/inf1.jpg']))"
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import torch

from .checkpoint import load_model
from .language import load_tokenizer
from .model import ClipCaptionModel
from .utils import resolve_device

log = logging.getLogger(__name__)


class Captioner:
    """Captions images (paths or PIL images) or stored CLIP embeddings with a ClipCap model."""

    def __init__(self, model: ClipCaptionModel, tokenizer, *, clip_model: Optional[str] = None,
                 device: str | torch.device = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.clip_model = clip_model or model.config.clip_model
        self._encoder = None

    @property
    def config(self):
        return self.model.config

    @property
    def encoder(self):
        """The CLIP image encoder, built on first use (stored embeddings never need it)."""
        if self._encoder is None:
            from .encoders import load_encoder

            if not self.clip_model:
                raise ValueError("this checkpoint does not record its CLIP encoder; pass clip_model=... (e.g. 'RN50x4')")
            encoder = load_encoder(self.clip_model, device=self.device)
            if encoder.embed_dim != self.config.clip_dim:
                raise ValueError(f"CLIP encoder {self.clip_model!r} gives {encoder.embed_dim}-d embeddings but the "
                                 f"checkpoint's mapper expects {self.config.clip_dim}-d; pass the encoder it was trained with")
            self._encoder = encoder
        return self._encoder

    def caption_embeddings(self, embeddings: torch.Tensor, **decoding: Any):
        """(N, D) CLIP image embeddings -> one caption per row (a list per row with num_return_sequences > 1)."""
        from .decoding import caption_embeddings

        return caption_embeddings(self, embeddings, **decoding)

    def caption(self, images: Sequence[Any] | Any, **decoding: Any):
        """Image paths or PIL images -> one caption each (a list each with num_return_sequences > 1)."""
        from .decoding import caption_images

        return caption_images(self, images, **decoding)


def load_captioner(checkpoint: str | os.PathLike, *, clip_model: Optional[str] = None, gpt2: Optional[str] = None,
                   device: str | torch.device = "auto") -> Captioner:
    """Load our checkpoint dir or an original ClipCap `.pt` into a ready Captioner."""
    dev = resolve_device(device)
    model = load_model(checkpoint, gpt2=gpt2, clip_model=clip_model, device=dev)
    tokenizer = load_tokenizer(gpt2 or model.config.gpt2)
    return Captioner(model, tokenizer, clip_model=clip_model, device=dev)
