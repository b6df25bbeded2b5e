"""Decoder layers on oneDNN (`backends.onednn`) against their own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfreward.engine.onednn import OneDnnLayers, use_onednn


def tiny(kind: str, dtype: torch.dtype):
    """A tiny random Gemma 3 (tanh GELU) or Llama (SiLU) of three layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
    if kind == "gemma":
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.to(dtype).eval()


INPUT = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def onednn_packs_bf16() -> bool:
    """Whether this CPU's oneDNN has a bf16 path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; not AVX2 alone)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 64)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("kind", ["gemma", "llama"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_onednn_layers_give_the_logits_of_the_models_own_forward(kind, dtype, tolerance):
    model = tiny(kind, dtype)
    with torch.inference_mode():
        plain = model(input_ids=INPUT).logits.float()
        packs = dtype == torch.float32 or onednn_packs_bf16()
        # q, k, v, o, gate, up, down; the head. Where oneDNN has no bf16 path every layer keeps its own forward.
        assert use_onednn(model) == (OneDnnLayers(linears=3 * 7 + 1, mlps=3) if packs else OneDnnLayers(0, 0))
        fused = model(input_ids=INPUT).logits.float()
    for module in [model.lm_head] + [m for layer in model.model.layers for m in (layer.mlp, layer.self_attn.q_proj)]:
        assert ("forward" in vars(module)) == packs
    # Rounding moves the logits by ~1e-7 of their size in fp32, ~3e-3 in bf16; a wrong post-op (no
    # activation, the activation on `up`) by about their own size.
    assert (fused - plain).abs().mean() <= tolerance * plain.abs().mean()


@pytest.mark.parametrize("kind,tied", [("gemma", True), ("llama", False)])
def test_packed_weights_give_the_products_of_the_layers_own_weights_bit_for_bit_in_bf16(kind, tied):
    """A decoder layer's product and the LM head's, whose weight is the input embedding's when tied."""
    if not onednn_packs_bf16():
        pytest.skip("this CPU's oneDNN has no bf16 path; the test above checks that the layers keep their own forward")
    model = tiny(kind, torch.bfloat16)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    use_onednn(model)
    x = torch.randn(5, 3, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    for linear in (model.model.layers[0].self_attn.q_proj, model.lm_head):
        with torch.inference_mode():
            assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight))
        assert "forward" in vars(linear)


def test_onednn_layers_leave_training_to_the_layers_own_forward():
    model = tiny("gemma", torch.float32)
    use_onednn(model)
    model(input_ids=INPUT).logits.sum().backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


class SwappedMLP(nn.Module):
    """The gated shape with the activation on the other product: `_fusable` cannot tell it apart."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_fused_mlp_skips_layers_whose_mlp_computes_something_else():
    model = tiny("llama", torch.float32)
    model.model.layers[0].mlp = SwappedMLP(model.model.layers[0].mlp)
    model.model.layers[1].mlp.act_fn = nn.ReLU()
    with torch.inference_mode():
        plain = model(input_ids=INPUT).logits
        assert use_onednn(model).mlps == 1  # only the third layer is the plain gated MLP
        torch.testing.assert_close(model(input_ids=INPUT).logits, plain, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.model.layers[0].mlp) and "forward" not in vars(model.model.layers[1].mlp)


@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_fused_mlp_in_fp32_gives_the_mlps_own_output_bit_for_bit(kind):
    """In fp32 the activation runs after the gate product (oneDNN's activation post-ops are the slow part of
    it there), so only the multiplication by `up` is fused, which rounds as the eager product does."""
    model = tiny(kind, torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 50, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        own = mlp(x)
        assert use_onednn(model).mlps == 3
        assert "forward" in vars(mlp)
        assert torch.equal(mlp(x), own)
