"""Our Llama against transformers' LlamaForCausalLM on the same weights, fp32, tiny random configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers import tiny_model
from unsloth_core.model import Llama, attend

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)
CONFIGS = {
    "gqa-tied": dict(),
    "gqa-untied": dict(tie_word_embeddings=False),
    "mha": dict(num_key_value_heads=4),
    "mqa-headdim": dict(num_key_value_heads=1, head_dim=32),
    "llama3-rope": dict(rope_scaling=LLAMA3_SCALING, max_position_embeddings=256),
    "biases": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
}


def hf_twin(model: Llama) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request: pytest.FixtureRequest) -> tuple[Llama, transformers.LlamaForCausalLM]:
    model = tiny_model(seed=1, **CONFIGS[request.param])
    if model.config.attention_bias:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
    return model, hf_twin(model)


def test_logits_match(pair: tuple[Llama, transformers.LlamaForCausalLM]) -> None:
    ours, hf = pair
    x = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert a is not None and a.abs().max() > 1  # meaningful logits, not all near zero
    assert (a - b).abs().max() <= 1e-4


def test_padding_matches(pair: tuple[Llama, transformers.LlamaForCausalLM]) -> None:
    ours, hf = pair
    x = torch.randint(0, ours.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    with torch.no_grad():
        a, b = ours(x, attention_mask=mask).logits, hf(x, attention_mask=mask).logits
    assert a is not None and not a.isnan().any()
    real = mask.bool()
    assert (a - b)[real].abs().max() <= 1e-4


def test_loss_matches(pair: tuple[Llama, transformers.LlamaForCausalLM]) -> None:
    ours, hf = pair
    x = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        a, b = ours(x, labels=labels).loss, hf(x, labels=labels).loss
    assert a is not None
    assert torch.allclose(a, b, atol=1e-5)


def test_position_ids_match() -> None:
    ours = tiny_model(seed=3)
    hf = hf_twin(ours)
    x = torch.randint(0, 256, (1, 12))
    pos = torch.arange(7, 19)[None]
    with torch.no_grad():
        assert (ours(x, position_ids=pos).logits - hf(x, position_ids=pos).logits).abs().max() <= 1e-4


def test_packed_rows_do_not_attend_across_samples() -> None:
    """Position ids that reset to 0 start a new sample: logits equal each sample run alone."""
    model = tiny_model(seed=4)
    a = torch.randint(0, 256, (1, 9))
    b = torch.randint(0, 256, (1, 6))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
    assert out is not None and alone is not None
    assert (out - alone).abs().max() <= 1e-4


def test_loss_without_logits_equals_loss_with() -> None:
    model = tiny_model(seed=5)
    x = torch.randint(0, 256, (2, 10))
    full = model(x, labels=x)
    lean = model(x, labels=x, return_logits=False)
    assert lean.logits is None
    assert full.loss is not None and lean.loss is not None
    assert torch.allclose(full.loss, lean.loss)


@pytest.mark.parametrize("t", [1, 5])  # a decode step; a masked prefill or packed row
def test_masked_grouped_attention_equals_sdpa_with_grouped_heads(t: int) -> None:
    """`attend` reshapes (one query token) or repeats K and V (longer queries) so that a masked call never needs
    SDPA's grouped-head support, which no fused GPU kernel has with a mask; values and gradients are unchanged."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, t, 9, 16, generator=g).transpose(1, 2).requires_grad_()  # (B, H, T, D), strided as in the model
    k, v = (torch.randn(2, 3, 17, 16, generator=g).requires_grad_() for _ in range(2))
    mask = torch.rand(2, 1, t, 17, generator=g) > 0.3
    mask[..., 0] = True
    ours = attend(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b)
