"""Shared fixtures: paths to the bundled data, tiny models built from configs (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves, and CI cores are shared

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
IMAGES = DATA / "images"  # the 18 real photos of ../shared/data/images, with captions.csv
FOOD_CAPTIONS = DATA / "Captions.csv"  # the Kaggle food dataset's caption file (no images)


@pytest.fixture
def tiny_model_factory():
    """Build a ClipCaptionModel on the seeded tiny GPT-2: factory(mapping_type=..., **config overrides)."""
    from foodcap.language import load_language_model
    from foodcap.model import ClipCaptionModel, ModelConfig

    def make(mapping_type: str = "mlp", seed: int = 0, **overrides) -> ClipCaptionModel:
        cfg = dict(mapping_type=mapping_type, prefix_length=4, clip_length=4, num_layers=2, clip_dim=64,
                   gpt2="tiny", clip_model="tiny", only_prefix=True)
        cfg.update(overrides)
        torch.manual_seed(seed)
        return ClipCaptionModel(ModelConfig(**cfg), load_language_model("tiny")).eval()

    return make


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave files worth looking at after a run (screenshots, reports)."""
    path = REPO / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def peaky_gpt():
    """A 64-token GPT-2 with large random weights: peaked, varied predictions, so captions end at many
    different lengths (decoding tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.4,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()
