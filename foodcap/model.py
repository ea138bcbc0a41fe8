"""The ClipCap network: a mapper from a CLIP image embedding to GPT-2 prefix embeddings, plus GPT-2.

Parameter names match the original ClipCap checkpoints (`clip_project.*`, `gpt.*`), so their state
dicts load strictly. Every script imports the model from here.

    python -c "from foodcap.model import ModelConfig; print(ModelConfig())"
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Everything needed to rebuild a ClipCaptionModel (stored as config.json in a checkpoint)."""

    mapping_type: str = "mlp"  # "mlp" | "transformer"
    prefix_length: int = 10
    clip_length: int = 10  # transformer mapper only: number of positions the CLIP vector is spread over
    num_layers: int = 8  # transformer mapper only
    num_heads: int = 8  # transformer mapper only (ClipCap fixes 8)
    clip_dim: int = 512
    clip_model: Optional[str] = None  # encoder name, e.g. "RN50x4", "ViT-B/32", "tiny"
    gpt2: str = "gpt2"  # HF name, local dir or "tiny"
    gpt2_config: Optional[dict] = None  # explicit GPT2Config (used when no name can rebuild it)
    only_prefix: bool = False  # GPT-2 frozen
    normalize_prefix: bool = False  # divide each CLIP embedding by its L2 norm before the mapper
    append_eos: bool = True  # captions were trained with an end-of-text token
    stop_token: Optional[str] = None  # text stop token for reference checkpoints (".")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config.json has unknown fields {unknown}; expected a subset of {sorted(known)}")
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise ValueError(f"config.json lacks the fields {missing}: without them the network cannot be rebuilt")
        return cls(**data)

    def __post_init__(self) -> None:
        if self.mapping_type not in ("mlp", "transformer"):
            raise ValueError(f"mapping_type must be 'mlp' or 'transformer', got {self.mapping_type!r}")
        for name in ("prefix_length", "clip_length", "num_layers", "num_heads", "clip_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# Fields a stored config must carry: their defaults could silently build a different network.
REQUIRED_FIELDS = ("mapping_type", "prefix_length", "clip_length", "num_layers", "clip_dim", "gpt2")


class MLP(nn.Module):
    """ClipCap's MLP mapper: Linear -> Tanh -> Linear (keys `model.0`, `model.2`)."""

    def __init__(self, sizes: tuple[int, ...], bias: bool = True, act=nn.Tanh):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, in_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, D)
        h = self.num_heads
        q = self.to_queries(x).reshape(b, n, h, c // h).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: CLIP vector -> clip_length tokens, + learned prefix constants."""

    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int,
                 num_layers: int = 8, num_heads: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, num_heads, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.linear(x).view(b, self.clip_length, -1)  # (B, L_clip, D)
        prefix = self.prefix_const.unsqueeze(0).expand(b, *self.prefix_const.shape)  # (B, P, D)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length:]  # (B, P, D)


class ClipCaptionModel(nn.Module):
    """GPT-2 conditioned on `prefix_length` embeddings computed from a CLIP image embedding.

    `forward(tokens, prefix, mask)` returns GPT-2's output whose `.logits` cover the prefix and the caption
    positions, (B, P + T, V), as ClipCap's does. Training uses `foodcap.training.CaptionLoss`, which runs the LM head only on caption positions.
    """

    def __init__(self, config: ModelConfig, gpt: nn.Module):
        super().__init__()
        self.config = config
        self.gpt = gpt
        self.prefix_length = config.prefix_length
        self.gpt_embedding_size = gpt.get_input_embeddings().weight.shape[1]
        d = self.gpt_embedding_size
        if config.mapping_type == "mlp":
            hidden = (d * config.prefix_length) // 2
            self.clip_project: nn.Module = MLP((config.clip_dim, hidden, d * config.prefix_length))
        else:
            self.clip_project = TransformerMapper(config.clip_dim, d, config.prefix_length, config.clip_length,
                                                  config.num_layers, config.num_heads)
        if config.only_prefix:
            self.gpt.requires_grad_(False)
            self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCaptionModel":
        super().train(mode)
        if self.config.only_prefix:
            self.gpt.eval()  # a frozen GPT-2 keeps dropout off, as ClipCapPrefix does
        return self

    def prepare_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (B, C) -> the float tensor the mapper sees (optionally L2-normalised)."""
        prefix = prefix.float()
        if self.config.normalize_prefix:
            prefix = prefix / prefix.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return prefix

    def embed_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (B, C) -> GPT-2 input embeddings (B, P, D)."""
        out = self.clip_project(self.prepare_prefix(prefix))
        return out.view(-1, self.prefix_length, self.gpt_embedding_size)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> Any:
        embedding_text = self.gpt.get_input_embeddings()(tokens)  # (B, T, D)
        prefix_embeds = self.embed_prefix(prefix).to(embedding_text.dtype)  # (B, P, D)
        inputs = torch.cat((prefix_embeds, embedding_text), dim=1)  # (B, P+T, D)
        if labels is not None:
            ignore = torch.full((tokens.shape[0], self.prefix_length), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat((ignore, labels), dim=1)
        return self.gpt(inputs_embeds=inputs, attention_mask=mask, labels=labels)

    def mapper_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("gpt.")}
