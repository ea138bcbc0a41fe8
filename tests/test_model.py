"""The ClipCap network: parameter layout and forward pass match the original model."""
from __future__ import annotations

import pytest
import torch

from foodcap.model import ClipCaptionModel, ModelConfig


def clipcap_transformer_mapper(state: dict, x: torch.Tensor, clip_length: int, num_layers: int, heads: int = 8):
    """ClipCap's TransformerMapper written out from its state dict, einsum by einsum (the original's maths)."""
    def lin(t, name, bias=True):
        out = t @ state[f"{name}.weight"].T
        return out + state[f"{name}.bias"] if bias else out

    def norm(t, name):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    b = x.shape[0]
    h = lin(x, "clip_project.linear").view(b, clip_length, -1)
    const = state["clip_project.prefix_const"]
    h = torch.cat((h, const.unsqueeze(0).expand(b, *const.shape)), dim=1)
    for i in range(num_layers):
        p = f"clip_project.transformer.layers.{i}"
        y = norm(h, f"{p}.norm1")
        n, c = y.shape[1], y.shape[2]
        q = lin(y, f"{p}.attn.to_queries", bias=False).reshape(b, n, heads, c // heads)
        kv = lin(y, f"{p}.attn.to_keys_values", bias=False).reshape(b, n, 2, heads, c // heads)
        att = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // heads) ** -0.5
        out = torch.einsum("bnmh,bmhd->bnhd", att.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c)
        h = h + lin(out, f"{p}.attn.project")
        y = norm(h, f"{p}.norm2")
        h = h + lin(torch.relu(lin(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return h[:, clip_length:]


def test_mlp_mapper_layout_matches_clipcap(tiny_model_factory):
    model = tiny_model_factory("mlp", prefix_length=4, clip_dim=64)
    sd = model.mapper_state_dict()
    d = model.gpt_embedding_size
    assert set(sd) == {"clip_project.model.0.weight", "clip_project.model.0.bias",
                       "clip_project.model.2.weight", "clip_project.model.2.bias"}
    assert sd["clip_project.model.0.weight"].shape == (4 * d // 2, 64)
    assert sd["clip_project.model.2.weight"].shape == (4 * d, 4 * d // 2)
    x = torch.randn(3, 64)
    expected = torch.tanh(x @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
    expected = expected @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]
    torch.testing.assert_close(model.embed_prefix(x), expected.view(3, 4, d))


def test_transformer_mapper_matches_clipcap_maths(tiny_model_factory):
    model = tiny_model_factory("transformer", prefix_length=5, clip_length=3, num_layers=2, clip_dim=64)
    sd = model.mapper_state_dict()
    d = model.gpt_embedding_size
    assert sd["clip_project.linear.weight"].shape == (3 * d, 64)
    assert sd["clip_project.prefix_const"].shape == (5, d)
    assert sd["clip_project.transformer.layers.1.attn.to_keys_values.weight"].shape == (2 * d, d)
    assert "clip_project.transformer.layers.0.attn.to_queries.bias" not in sd
    assert "clip_project.transformer.layers.0.attn.to_keys_values.bias" not in sd
    assert sd["clip_project.transformer.layers.0.mlp.fc1.weight"].shape == (2 * d, d)  # mlp ratio 2
    x = torch.randn(2, 64)
    with torch.no_grad():
        ours = model.embed_prefix(x)
        ref = clipcap_transformer_mapper(sd, x, clip_length=3, num_layers=2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_forward_logits_cover_prefix_and_caption(tiny_model_factory, mapping_type):
    model = tiny_model_factory(mapping_type)
    tokens = torch.randint(0, 50257, (2, 7))
    out = model(tokens, torch.randn(2, 64), mask=torch.ones(2, 4 + 7))
    assert out.logits.shape == (2, 4 + 7, 50257)
    # The caption part equals GPT-2 run on [prefix embeddings; token embeddings].
    prefix = torch.randn(2, 64)
    with torch.no_grad():
        embeds = torch.cat((model.embed_prefix(prefix), model.gpt.transformer.wte(tokens)), 1)
        torch.testing.assert_close(model(tokens, prefix).logits, model.gpt(inputs_embeds=embeds).logits)


def test_only_prefix_freezes_gpt2_and_keeps_it_in_eval(tiny_model_factory):
    model = tiny_model_factory("mlp", only_prefix=True)
    model.train()
    assert not model.gpt.training and model.clip_project.training
    assert not any(p.requires_grad for p in model.gpt.parameters())
    assert all(p.requires_grad for p in model.clip_project.parameters())
    tuned = tiny_model_factory("mlp", only_prefix=False).train()
    assert tuned.gpt.training and all(p.requires_grad for p in tuned.gpt.parameters())


def test_normalize_prefix_divides_rows_by_l2_norm(tiny_model_factory):
    model = tiny_model_factory("mlp", normalize_prefix=True)
    x = torch.randn(3, 64) * 7
    torch.testing.assert_close(model.embed_prefix(x), model.embed_prefix(x / x.norm(dim=-1, keepdim=True)))


def test_config_rejects_unknown_fields_and_mapping_types():
    with pytest.raises(ValueError, match="mapping_type"):
        ModelConfig(mapping_type="lstm")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({"mapping_type": "mlp", "bogus": 1})
    assert ModelConfig.from_dict(ModelConfig(prefix_length=7).to_dict()).prefix_length == 7
    with pytest.raises(ValueError, match=r"lacks the fields \['clip_dim'\]"):
        ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "clip_dim"})
    with pytest.raises(ValueError, match="prefix_length must be a positive integer, got '10'"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "prefix_length": "10"})
