"""Gemma's RMS norm in place (`backends.norms`) against its own forward."""

from __future__ import annotations

import torch

from selfreward.engine.norms import use_inplace_norms
from tests.test_onednn import INPUT, tiny


def test_inplace_norms_give_the_models_own_logits_bit_for_bit_in_bf16():
    model = tiny("gemma", torch.bfloat16)
    for parameter in model.parameters():  # norm weights away from their zero start, so (1 + weight) matters
        parameter.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = model(input_ids=INPUT).logits
        assert use_inplace_norms(model) == 3 * 6 + 1  # four per layer, on queries and keys, and the final one
        assert torch.equal(model(input_ids=INPUT).logits, plain)


def test_inplace_norms_leave_other_norms_and_training_alone():
    llama = tiny("llama", torch.float32)
    assert use_inplace_norms(llama) == 0  # Llama weights x, not (1 + weight) x
    gemma = tiny("gemma", torch.float32)
    use_inplace_norms(gemma)
    gemma(input_ids=INPUT).logits.sum().backward()
    assert gemma.model.layers[0].input_layernorm.weight.grad is not None


def test_models_off_the_cpu_keep_their_own_norms_and_linears():
    from selfreward.engine.onednn import OneDnnLayers, use_onednn

    model = tiny("gemma", torch.bfloat16).to("meta")  # stands for a GPU: a device that is not the CPU
    assert use_inplace_norms(model) == 0
    assert use_onednn(model) == OneDnnLayers(0, 0)
    assert not any("forward" in vars(module) for module in model.modules())
