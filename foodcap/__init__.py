"""foodcap: CLIP-prefix image captioning (ClipCap) for food photos and any domain of your own."""
from __future__ import annotations

__version__ = "0.1.0"

from .captioner import Captioner, load_captioner  # noqa: E402
from .model import ClipCaptionModel, ModelConfig  # noqa: E402

__all__ = ["Captioner", "ClipCaptionModel", "ModelConfig", "load_captioner", "__version__"]
