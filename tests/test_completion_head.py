"""The label-positions-only LM head gives TRL's fused head's losses, metrics and gradients."""

from __future__ import annotations

import pytest
import torch

from selfreward.train import completion_head


def outputs_and_grads(model, batch, labels):
    model.zero_grad()
    out = model(**batch, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("chunk_elements", [completion_head.CHUNK_ELEMENTS, 512 * 7])  # one chunk; many chunks
def test_label_positions_head_equals_trl_fused_head(tiny_model, chunk_elements):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 30:] = 0  # padding
    labels = input_ids.masked_fill(torch.arange(40) < torch.tensor([[10], [25], [5]]), -100).masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    theirs, their_grads = outputs_and_grads(model, batch, labels)

    completion_head.add_completion_head(model, chunk_elements)
    ours, our_grads = outputs_and_grads(model, batch, labels)

    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=1e-4, atol=1e-5)
    assert torch.equal(ours.is_top1, theirs.is_top1) and torch.equal(ours.label_mask, theirs.label_mask)
    assert their_grads.keys() == our_grads.keys() and our_grads
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-6)
    # Without fused_lm_head the model is the plain one (generation is unchanged).
    assert model(**batch).logits.shape == (3, 40, model.config.vocab_size)
