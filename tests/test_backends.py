from __future__ import annotations

import pytest

from selfreward.backends import Sampling, choose_kind, open_backend
from selfreward.backends.base import cut_at_stop
from selfreward.recipe import BackendSection


@pytest.fixture(scope="module")
def backend(tiny_model):
    backend = open_backend(tiny_model, BackendSection(kind="transformers", dtype="float32", batch_size=8))
    yield backend
    backend.close()


def test_generate_returns_n_completions_per_prompt_in_order(backend):
    prompts = [backend.chat_prompt([{"role": "user", "content": text}]) for text in ["a", "a much longer question here", "b"]]
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    outputs = backend.generate(prompts, 3, greedy)
    assert [len(row) for row in outputs] == [3, 3, 3]
    # Sorting by length inside the backend must not reorder results: each prompt alone gives the same text.
    for prompt, row in zip(prompts, outputs):
        (alone,) = backend.generate([prompt], 1, greedy)
        assert row[0].text == alone[0].text and row[0].tokens <= 6


def test_chat_prompt_has_one_bos_and_ends_ready_for_the_answer(backend):
    prompt = backend.chat_prompt([{"role": "user", "content": "hi"}])
    ids = backend.encode(prompt)
    assert ids.count(backend.tokenizer.bos_token_id) == 1 and ids[0] == backend.tokenizer.bos_token_id
    assert prompt.endswith("<start_of_turn>model\n")


def test_next_token_probs_are_probabilities(backend):
    # This BPE merges the space into the digit (" 4"), as many tokenizers do; Gemma's does not.
    assert backend.single_token_ids("Score: ", [str(s) for s in range(6)]) is None
    ids = backend.single_token_ids("Score:", [f" {s}" for s in range(6)])
    assert ids is not None and len(set(ids)) == 6
    (row,) = backend.next_token_probs([backend.text_prompt("Score:")], ids)
    assert all(0 <= p <= 1 for p in row) and 0 < sum(row) <= 1


def test_cut_at_stop_keeps_the_stop_string_only_when_asked():
    assert cut_at_stop("why. Score: 4 more", Sampling(stop=("Score: 4",))) == ("why. ", True)
    assert cut_at_stop("why. Score: 4 more", Sampling(stop=("Score: 4",), keep_stop=True)) == ("why. Score: 4", True)
    assert cut_at_stop("nothing", Sampling(stop=("x",))) == ("nothing", False)


def test_auto_backend_is_transformers_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert choose_kind("auto") == "transformers"


def test_auto_dtype_loads_bf16_only_where_the_cpu_computes_it_natively(tiny_model):
    import torch

    from selfreward.precision import cpu_has_fast_bf16, inference_dtype

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    backend = open_backend(tiny_model, BackendSection(kind="transformers", batch_size=8))  # dtype: auto
    try:
        expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        assert backend.model.dtype == expected and backend.dtype == str(expected).removeprefix("torch.")
    finally:
        backend.close()
    assert inference_dtype("float16", "cpu") == "float16"  # an explicit choice is kept
    assert inference_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")


def test_emulated_bf16_on_a_cpu_warns_and_training_precision_follows_the_hardware(caplog):
    from selfreward.precision import cpu_has_fast_bf16, inference_dtype, train_in_bf16

    with caplog.at_level("WARNING", logger="selfreward.precision"):
        inference_dtype("bfloat16", "cpu")
    assert ("emulated" in caplog.text) == (not cpu_has_fast_bf16())
    assert train_in_bf16("bf16", "cpu") and not train_in_bf16("fp32", "cpu")
    assert train_in_bf16("auto", "cpu") == cpu_has_fast_bf16()
