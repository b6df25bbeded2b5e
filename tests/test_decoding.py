"""The fast sampler (`backends.decoding`) against a plain reference: same tokens on a fixed seed."""

from __future__ import annotations

import pytest
import torch

from selfreward.backends.base import Sampling
from selfreward.engine.decoding import sample
from selfreward.engine.top_p import nucleus, row_uniforms, sample_tokens, top_candidates
from selfreward.recipe import BackendSection


def hf_top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens transformers' own top-p warper keeps (True = kept)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    warped = TopPLogitsWarper(top_p)(None, probs.log())
    return warped > float("-inf")


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_nucleus_keeps_exactly_the_tokens_transformers_top_p_keeps(top_p):
    generator = torch.Generator().manual_seed(0)
    # Peaked rows (nucleus inside the first candidates) and flat rows (the candidate set must grow).
    logits = torch.cat([torch.randn(4, 5120, generator=generator) * 6, torch.randn(4, 5120, generator=generator) * 0.1])
    probs = torch.softmax(logits, dim=-1)
    ids, kept = nucleus(logits, 1.0, top_p)
    ours = torch.zeros_like(probs, dtype=torch.bool)
    for row in range(probs.shape[0]):
        ours[row, ids[row][kept[row] > 0]] = True
    assert torch.equal(ours, hf_top_p_mask(probs, top_p))


@pytest.mark.parametrize("k", [1, 16, 300])
def test_top_candidates_by_block_maxima_equal_torch_topk(k):
    values = torch.randn(5, 256 * 64, generator=torch.Generator().manual_seed(k))
    values[0, :300] = 10.0 + torch.arange(300) * 1e-3  # the largest values crowded into few blocks
    top, ids = top_candidates(values, k)
    expected_top, expected_ids = torch.topk(values, k)
    assert torch.equal(top, expected_top) and torch.equal(ids, expected_ids)


def reference_token(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
    """The plain way: the full vocabulary sorted, transformers' top-p mask, inverse transform of u."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:  # the nucleus, best first
        probs = probs * hf_top_p_mask(probs.unsqueeze(0), top_p)[0]
        order = torch.argsort(probs, descending=True, stable=True)
    else:  # the whole vocabulary, in vocabulary order
        order = torch.arange(probs.shape[0])
    cumulative = probs[order].double().cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor([u * float(cumulative[-1])], dtype=torch.float64), right=True))
    return int(order[min(index, int((probs > 0).sum()) - 1)])


def reference_sample(model, prompt: list[int], temperature, top_p, max_new_tokens, stop_ids, stopped, seed) -> list[int]:
    """One sequence at a time, no cache: the whole text is recomputed for every new token."""
    uniforms = row_uniforms([seed], max_new_tokens)[0]
    tokens: list[int] = []
    for step in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
        tokens.append(reference_token(logits, temperature, top_p, float(uniforms[step])))
        if tokens[-1] in stop_ids or stopped(tokens):
            break
    return tokens


def tiny_gemma(tokenizer_dir: str, tmp_path):
    """A tiny random Gemma 3 with a sliding window shorter than the prompts (the embedded model's layout)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    return model, tokenizer


PROMPTS = ["Explain why the sky is blue.", "Hi", "Write a short poem about the sea and the wind in winter, please."]


# Sorted by length: "Hi", the sky and the grass (as long as each other), the poem.
SAMPLED_PROMPTS = PROMPTS + ["Explain why the grass is green."]
# (max_rows, prefill_tokens) with n = 3 samples of each: all rows at once in one pass; in passes of at most 24
# tokens, each padded to its own longest prompt; one prompt at a time; two at a time, each next prompt joining
# the rows still decoding once three have finished (it is shorter than their rows so far); three at a time,
# the poem joining once five have finished (longer than the rows so far).
SCHEDULES = [(None, float("inf")), (None, 24), (3, float("inf")), (6, 24), (9, float("inf"))]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
@pytest.mark.parametrize("max_rows,prefill_tokens", SCHEDULES)
@pytest.mark.parametrize("start", ["none", "rubric", "instructions"])
def test_batched_shared_prefix_sampling_equals_one_sequence_at_a_time_without_cache(tiny_model, tmp_path, temperature, top_p, grouped,
                                                                                     max_rows, prefill_tokens, start):
    """Also with the prompts read in several passes, and with prompts joining rows already decoding: a joined
    cache that put a row's positions anywhere but at the right end of its row samples other tokens. With a
    start all prompts share (a rubric; then also rows of one pass sharing an instruction after it), that
    start is computed once and the rest of each prompt read right-padded after it."""
    from selfreward.engine.attention import use_grouped_attention

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    if grouped:  # batched prompts and decoding steps through grouped attention; the reference's unpadded rows use sdpa
        assert use_grouped_attention(model)
    texts = {"none": SAMPLED_PROMPTS, "rubric": [RUBRIC + p for p in SAMPLED_PROMPTS],
             "instructions": SAME_INSTRUCTION + LONG_INSTRUCTION[:2]}[start]
    encoded = [tokenizer(p)["input_ids"] for p in texts]
    # Many stop ids (a random model's choices are spread thin), so that rows finish at different steps and
    # leave the batch.
    stop_ids = set(range(100, 160)) if temperature > 0 else set()
    n, seeds = 3, [1000 + r for r in range(len(encoded) * 3)]
    with torch.inference_mode():
        fast = sample(model, encoded, n, temperature, top_p, 12, stop_ids, lambda t: False, seeds, tokenizer.pad_token_id,
                      max_rows=max_rows, prefill_tokens=prefill_tokens)
        slow = [reference_sample(model, encoded[r // n], temperature, top_p, 12, stop_ids, lambda t: False, seeds[r])
                for r in range(len(seeds))]
    assert fast == slow
    assert len({len(row) for row in fast}) > 1 or temperature == 0  # rows did finish at different steps


def test_greedy_generation_equals_transformers_generate(tiny_model):
    from transformers import AutoModelForCausalLM

    from selfreward.backends.transformers import TransformersBackend
    from selfreward.engine.attention import GROUPED_ATTENTION

    backend = TransformersBackend(tiny_model, BackendSection(kind="transformers", dtype="float32", batch_size=8))
    assert backend.model.config._attn_implementation == GROUPED_ATTENTION  # 4 query heads on 2 key/value heads
    prompts = [backend.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = backend.generate(prompts, 1, Sampling(temperature=0, max_new_tokens=10))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([backend.encode(prompt)])
        out = model.generate(ids, do_sample=False, max_new_tokens=10, eos_token_id=list(backend.stop_ids), pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        assert row[0].text == backend._completion(new, Sampling(temperature=0)).text


def test_sampled_completions_do_not_depend_on_batch_size_or_on_the_other_prompts(tiny_model):
    from selfreward.backends.transformers import TransformersBackend

    sampling = Sampling(temperature=0.9, top_p=0.9, max_new_tokens=10, seed=5)
    runs = []
    for batch_size in (2, 16):
        backend = TransformersBackend(tiny_model, BackendSection(kind="transformers", dtype="float32", batch_size=batch_size))
        prompts = [backend.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
        runs.append([[c.text for c in row] for row in backend.generate(prompts, 2, sampling)])
    assert runs[0] == runs[1]
    assert runs[0][0][0] != runs[0][0][1]  # the two samples of a prompt differ


def test_stop_string_ends_generation_at_the_token_that_completes_it(tiny_model):
    from selfreward.backends.transformers import TransformersBackend

    backend = TransformersBackend(tiny_model, BackendSection(kind="transformers", dtype="float32", batch_size=4))
    stopped = backend._stop_string_check(("Score: 3",))
    tokens = backend.encode("Fine reasoning. Score: 3 and more")
    cut = next(i for i in range(1, len(tokens) + 1) if stopped(tokens[:i]))
    assert backend.tokenizer.decode(tokens[:cut]).endswith("Score: 3")
    assert not stopped(backend.encode("Score: 4"))


def attention_inputs(heads: int, kv_heads: int, queries: int, padding: str, seed: int = 0, cached: int = 4,
                     window: int | None = None):
    """Random (rows, heads, queries, dim) query and (rows, kv heads, keys, dim) key and value after `cached`
    positions, with the boolean mask transformers builds for sdpa: causal (within a sliding `window` if
    given), and padding on the left or the right of rows of different lengths (None: no padding)."""
    generator = torch.Generator().manual_seed(seed)
    rows, dim = 3, 8
    keys = cached + queries
    query = torch.randn(rows, heads, queries, dim, generator=generator)
    key, value = (torch.randn(rows, kv_heads, keys, dim, generator=generator) for _ in range(2))
    position, seen = torch.arange(queries)[:, None] + cached, torch.arange(keys)[None, :]
    mask = ((seen <= position) & ((seen > position - window) if window else True))[None, None].expand(rows, 1, -1, -1)
    pads = torch.tensor([0, 2, 3])[:, None, None, None]
    if padding == "left":
        mask = mask & (torch.arange(keys) >= pads)
    elif padding == "right":
        mask = mask & (torch.arange(keys) < keys - pads)
    return query, key, value, mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("queries", [1, 7])
@pytest.mark.parametrize("padding", ["left", "right", None])
def test_grouped_attention_equals_sdpa_attention(heads, kv_heads, queries, padding):
    """A decoding step and a prompt's queries, against transformers' sdpa with the key/value heads repeated:
    a query head read against the wrong key/value head, or a mask applied to the wrong row or query, fails
    it. Only queries that attend to something are compared (a left-padding query attends to nothing)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfreward.engine.attention import grouped_attention

    query, key, value, mask = attention_inputs(heads, kv_heads, queries, padding, seed=heads * 10 + kv_heads)
    if padding is None and queries == 1:
        mask = None  # transformers' decoding mask when no row is padded
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    ours, _ = grouped_attention(module, query, key, value, mask, scaling=0.3)
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == plain.shape == (3, queries, heads, 8)
    attends = torch.ones(3, queries, dtype=torch.bool) if mask is None else mask[:, 0].any(-1)
    torch.testing.assert_close(ours[attends], plain[attends], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaling", [0.25, 0.3])
def test_grouped_attention_in_bf16_is_fp32_attention_up_to_bf16_rounding(scaling):
    """bf16 keeps its scores and probabilities in bf16 (scaled query, softmax that works in fp32 inside):
    the output stays within a few bf16 units of fp32 attention on the same inputs."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfreward.engine.attention import grouped_attention

    query, key, value, mask = (t.bfloat16() if t.is_floating_point() else t for t in attention_inputs(4, 1, 7, "right"))
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    ours, _ = grouped_attention(module, query, key, value, mask, scaling=scaling)
    plain, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, scaling=scaling)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scores_per_slice,query_block", [(1, 128), (4 * 7 * 11, 128), (3 * 4 * 7 * 11 - 1, 128), (1 << 30, 3), (4 * 3 * 11, 2)])
def test_sliced_attention_is_the_same_in_slices_of_queries_or_of_rows(scores_per_slice, query_block):
    from selfreward.engine.attention import sliced_attention

    query, key, value, mask = attention_inputs(4, 1, 7, "right")
    whole = sliced_attention(query, key, value, mask, 0.3, scores_per_slice=1 << 30)
    sliced = sliced_attention(query, key, value, mask, 0.3, scores_per_slice, query_block)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("windowed_mask", [True, False])
def test_grouped_attention_with_a_sliding_window_equals_sdpa_and_reads_no_key_before_the_window(windowed_mask):
    """12 queries after 10 cached positions, a window of 4: no query sees keys 0-6, so values there that
    would poison any product they entered (NaN) must not change the output. With a mask that is not
    windowed (a model whose layer says otherwise) every key is read and the output is plain causal attention."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfreward.engine.attention import grouped_attention

    cached, window = 10, 4
    query, key, value, mask = attention_inputs(4, 1, 12, "right", seed=1, cached=cached, window=window if windowed_mask else None)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    poisoned = value.clone()
    if windowed_mask:
        poisoned[:, :, : cached - window + 1] = float("nan")
    ours, _ = grouped_attention(module, query, key, poisoned, mask, scaling=0.3, sliding_window=window)
    attends = mask[:, 0].any(-1)
    torch.testing.assert_close(ours[attends], plain[attends], rtol=1e-6, atol=1e-6)


def test_sample_tokens_is_greedy_at_temperature_zero_and_follows_the_uniform_number():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_tokens(logits, 0.0, 0.9, torch.zeros(2)).tolist() == [1, 0]
    # With top_p = 1 the rows' cumulative probabilities split [0, 1) among the tokens in vocabulary order.
    low, high = sample_tokens(logits, 1.0, 1.0, torch.tensor([0.0, 0.0])), sample_tokens(logits, 1.0, 1.0, torch.tensor([0.999, 0.999]))
    assert low.tolist() == [0, 0] and high.tolist() == [2, 2]


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it on one)")


@GPU
@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sampling_on_a_gpu_draws_the_tokens_it_draws_on_the_cpu(top_p):
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(0)) * 3
    uniforms = row_uniforms(range(16), 1)[:, 0]
    on_cpu = sample_tokens(logits, 0.7, top_p, uniforms)
    assert sample_tokens(logits.cuda(), 0.7, top_p, uniforms).cpu().tolist() == on_cpu.tolist()


@GPU
def test_transformers_backend_on_a_gpu_generates_the_texts_it_generates_on_the_cpu(tiny_model):
    from selfreward.backends.transformers import TransformersBackend

    sampling = Sampling(temperature=0.9, top_p=0.9, max_new_tokens=10, seed=5)
    backend = TransformersBackend(tiny_model, BackendSection(kind="transformers", dtype="float32", batch_size=4))
    assert backend.model.device.type == "cuda"
    prompts = [backend.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    on_gpu = [[c.text for c in row] for row in backend.generate(prompts, 2, sampling)]
    backend.model.to("cpu")
    assert [[c.text for c in row] for row in backend.generate(prompts, 2, sampling)] == on_gpu


RUBRIC = "Rate the response on a scale of 0 to 5, one point per criterion met. "
# Two answers to one long instruction: rows that share more than the rubric.
SAME_INSTRUCTION = [RUBRIC + "Describe the water cycle in detail, step by step, for a class of ten year olds. " + a
                    for a in ("Water evaporates, condenses and falls.", "Rain.")]
# Three answers to an instruction long enough that computing it once pays for a group of its own.
LONG_INSTRUCTION = [RUBRIC + "Plan a three day walking tour of Lisbon for two retired teachers who love tiled churches, quiet "
                    "viewpoints, fresh fish and old bookshops, avoid steep climbs after lunch, and end each day near "
                    "a tram stop. Say what to book ahead and what to skip. " + a
                    for a in ("Day one: Alfama and the cathedral.", "Stay in Baixa; take tram 28 early.", "Lisbon is hilly.")]


@pytest.mark.parametrize("shared", [True, False])
def test_last_token_hidden_through_the_head_equals_a_plain_forward_pass_of_each_prompt(tiny_model, tmp_path, shared):
    from selfreward.engine.prefill import head_logits, last_token_hidden

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    rows = [tokenizer((RUBRIC if shared else "") + p + " Score:")["input_ids"] for p in PROMPTS]
    with torch.inference_mode():
        fast = head_logits(model, last_token_hidden(model, rows, tokenizer.pad_token_id))
        plain = torch.stack([model(input_ids=torch.tensor([row])).logits[0, -1] for row in rows])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_last_layer_only_at_gives_the_kept_positions_their_full_pass_output_and_computes_no_other(tiny_model, tmp_path):
    from selfreward.engine.prefill import last_layer_only_at

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    input_ids = torch.tensor([tokenizer(p)["input_ids"][:8] for p in (PROMPTS[0], PROMPTS[2])])
    rows, positions = torch.tensor([0, 1, 1]), torch.tensor([7, 2, 5])
    seen = []
    model.model.layers[-1].mlp.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[:-1].numel()))
    with torch.inference_mode():
        plain = model(input_ids=input_ids).logits
        with last_layer_only_at(model, rows, positions):
            fast = model(input_ids=input_ids).logits
        assert seen == [16, 3]  # the MLP of the last layer saw every position, then only the three kept ones
        torch.testing.assert_close(fast[rows, positions], plain[rows, positions], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fast[0, :7], plain[0, :7])  # positions that were not kept are not computed
        torch.testing.assert_close(model(input_ids=input_ids).logits, plain)  # the hooks are gone after the block


def test_last_token_hidden_from_a_call_wide_prefix_through_the_head_equals_a_plain_forward_pass(tiny_model, tmp_path):
    """A prefix computed once for all rows, then batches of them: one whose rows share more than it (the
    instruction, computed once more for the batch), one whose rows share only it, and a single row."""
    from selfreward.engine.prefill import extended_prefix, head_logits, last_token_hidden, shared_prefix_length

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    rows = [tokenizer(text + " Score:")["input_ids"] for text in SAME_INSTRUCTION + [RUBRIC + p for p in PROMPTS]]
    with torch.inference_mode():
        length = shared_prefix_length(rows)
        assert length >= len(tokenizer(RUBRIC)["input_ids"]) - 1
        prefix = extended_prefix(model, None, rows[0], length)
        fast = torch.cat([head_logits(model, last_token_hidden(model, [rows[i] for i in batch], tokenizer.pad_token_id, prefix))
                          for batch in ([0, 1], [2, 3, 4], [1])])
        plain = torch.stack([model(input_ids=torch.tensor([rows[i]])).logits[0, -1] for i in (0, 1, 2, 3, 4, 1)])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_last_token_hidden_computes_a_lone_row_in_one_pass_and_rows_sharing_more_than_the_prefix_in_two(tiny_model, tmp_path):
    from selfreward.engine.prefill import extended_prefix, head_logits, last_token_hidden, prefix_plan

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    rows = [tokenizer(text + " Score:")["input_ids"] for text in SAME_INSTRUCTION]
    rubric = len(tokenizer(RUBRIC)["input_ids"]) - 1
    passes = []
    with torch.inference_mode():
        prefix = extended_prefix(model, None, rows[0], rubric)
        model.get_decoder().register_forward_hook(lambda module, args, kwargs, output: passes.append(kwargs["input_ids"].shape),
                                                  with_kwargs=True)
        fast = head_logits(model, last_token_hidden(model, [rows[1]], tokenizer.pad_token_id, prefix))
        assert passes == [(1, len(rows[1]) - rubric)]
        last_token_hidden(model, rows, tokenizer.pad_token_id, prefix)
        assert len(passes) == 3  # the instruction once, then the two answers
        plain = model(input_ids=torch.tensor([rows[1]])).logits[0, -1]
    torch.testing.assert_close(fast[0], plain, rtol=1e-5, atol=1e-5)
    assert prefix_plan([rows[1]], overhead=0) == (0, [(0, [0])])  # a call with one prompt: no start of its own


def test_prefix_groups_keep_the_instructions_whose_shared_tokens_outweigh_a_group_of_their_own():
    from selfreward.engine.prefill import MIN_SHARED_PREFIX, planned_tokens, prefix_groups

    rubric, long, short = list(range(100, 110)), list(range(200, 240)), list(range(300, 300 + MIN_SHARED_PREFIX - 1))
    rows = [rubric + long + [1], rubric + [7, 8], rubric + long + [2, 3], rubric + short + [4],
            rubric + long + [5], rubric + short + [6], [9] * 12]
    # Three rows share 40 tokens past the rubric: 2 x 40 saved > 50, a group. Two share 15 (< MIN_SHARED_PREFIX).
    assert prefix_groups(rows, len(rubric), overhead=50) == [(50, [0, 2, 4]), (10, [1, 3, 5, 6])]
    # The rubric once, the long instruction once (40) and 4 tokens after it, the other rows past the rubric.
    assert planned_tokens(rows, 10, [(50, [0, 2, 4]), (10, [1, 3, 5, 6])]) == 10 + 40 + 4 + (2 + 16 + 16 + 2)
    # Saving 80 tokens does not outweigh an overhead of 80: everything stays in the group at the start.
    assert prefix_groups(rows, len(rubric), overhead=80) == [(10, list(range(7)))]
    # From the first token on, the short instruction's rows share 25 tokens: a group of its own where that pays.
    assert prefix_groups(rows, 0, overhead=20) == [(50, [0, 2, 4]), (25, [3, 5]), (0, [1, 6])]


def test_next_token_probs_do_not_depend_on_how_prompts_are_batched(tiny_model, tmp_path):
    from selfreward.backends.transformers import TransformersBackend
    from selfreward.engine.prefill import PREFIX_GROUP_OVERHEAD_TOKENS, prefix_plan

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    with_rubric = SAME_INSTRUCTION + LONG_INSTRUCTION + [RUBRIC + p for p in PROMPTS]  # a call whose rows share the rubric
    encoded = [tokenizer(p)["input_ids"] for p in with_rubric]
    _, groups = prefix_plan(encoded, PREFIX_GROUP_OVERHEAD_TOKENS)
    assert [members for _, members in groups[:-1]] == [[2, 3, 4]]  # the long instruction is computed once
    prompts = with_rubric + ["Unrelated prompt without the rubric."]  # a call whose rows share nothing
    ids = list(range(5, 11))
    with torch.inference_mode():
        plain = [torch.softmax(model(input_ids=torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])).logits[0, -1], -1)[ids].tolist()
                 for p in prompts]
    for batch_size, prefill_tokens in ((1, 4096), (8, 4096), (8, 40)):
        backend = TransformersBackend(str(tmp_path / "gemma"), BackendSection(
            kind="transformers", dtype="float32", batch_size=batch_size, prefill_tokens=prefill_tokens))
        # No call-wide prefix; the rubric as call-wide prefix; a prompt alone.
        for call in (range(len(prompts)), range(len(with_rubric)), [2]):
            probs = backend.next_token_probs([prompts[i] for i in call], ids)
            torch.testing.assert_close(torch.tensor(probs), torch.tensor([plain[i] for i in call]), rtol=1e-5, atol=1e-6)


def test_padded_batches_choose_the_cheapest_cuts_within_both_limits():
    import itertools
    import random

    from selfreward.engine.prefill import padded_batches

    def cost(batches, lengths, overhead):
        return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)

    generator = random.Random(0)
    for trial in range(40):
        lengths = [generator.choice([5, 6, 40, 41, 42, 300]) + generator.randrange(3) for _ in range(generator.randrange(1, 8))]
        max_rows, max_tokens, overhead = generator.choice([2, 3, 8]), generator.choice([50, 200, 4096]), generator.choice([0, 10, 100])
        batches = padded_batches(lengths, max_rows, max_tokens, overhead)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) == 1 or (len(batch) <= max_rows and len(batch) * max(lengths[i] for i in batch) <= max_tokens)
        # Against every way of cutting the length-sorted rows into consecutive batches within the limits.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            split, start = [], 0
            for position, cut in enumerate(cuts, 1):
                if cut:
                    split.append(order[start:position])
                    start = position
            split.append(order[start:])
            if all(len(b) == 1 or (len(b) <= max_rows and len(b) * max(lengths[i] for i in b) <= max_tokens) for b in split):
                best = min(best, cost(split, lengths, overhead))
        assert cost(batches, lengths, overhead) == best
    # Padding a short row to a long one costs more than a pass: they are cut apart, the alike kept together.
    assert padded_batches([10, 11, 400, 401], 8, 4096, overhead=32) == [[0, 1], [2, 3]]


def test_reserved_cache_gives_the_logits_of_dynamic_cache_through_row_drops_moves_and_the_sliding_window(tiny_model, tmp_path):
    from transformers import DynamicCache

    from selfreward.engine.kv_cache import reserved_cache

    model, tokenizer = tiny_gemma(tiny_model, tmp_path)  # sliding window 6, prompts longer than it
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in PROMPTS]}, return_tensors="pt")
    runs = []
    for cache in (DynamicCache(config=model.config), reserved_cache(model.config, capacity=4)):  # capacity must grow
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = []
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(2)
            mask, position = mask.repeat_interleave(2, dim=0), positions[:, -1:].repeat_interleave(2, dim=0)
            token = out.logits[:, -1].argmax(-1).repeat_interleave(2).unsqueeze(-1)
            for step in range(10):
                if step in (4, 7):  # two rows finish and leave the batch; then one, and the rest change places
                    keep = torch.tensor([0, 2, 3, 5] if step == 4 else [3, 0, 2])
                    cache.batch_select_indices(keep)
                    mask, position, token = mask[keep], position[keep], token[keep]
                mask, position = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1), position + 1
                step_logits = model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                                    use_cache=True).logits[:, -1]
                logits.append(step_logits)
                token = step_logits.argmax(-1, keepdim=True)
        runs.append(logits)
    for dynamic, reserved in zip(*runs):
        assert torch.equal(dynamic, reserved)


def test_packed_order_moves_only_the_kept_rows_beyond_the_packed_slots():
    from selfreward.engine.decoding import packed_order

    assert packed_order([0, 2, 3, 5]) == [0, 5, 2, 3]  # slot 1 freed: the kept slot 5 moves in, the rest stay
    assert packed_order([0, 1, 2]) == [0, 1, 2]  # the last rows finished: nothing moves
    assert packed_order([4, 5]) == [4, 5]
    for keep in ([1, 3, 4, 6, 7], [0, 7], [2]):
        order = packed_order(keep)
        assert sorted(order) == keep
        assert sum(new != old for new, old in enumerate(order)) == sum(slot >= len(keep) for slot in keep)


class RecordingModel:
    """A model that records the attention-mask width of every forward pass (the cache's stored positions)."""

    def __init__(self, model) -> None:
        self.model, self.widths = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kwargs):
        self.widths.append(kwargs["attention_mask"].shape[-1])
        return self.model(**kwargs)


def test_rows_joining_late_do_not_carry_the_padding_of_rows_that_left(tiny_model, tmp_path):
    """Twelve short prompts two at a time: each join pads the new rows only to the live rows' own tokens (at
    most a prompt and max_new_tokens), so after it the rows grow by at most max_new_tokens more, however
    many rows came and went before. Carrying every earlier row's padding on reached 61 positions here."""
    model, tokenizer = tiny_gemma(tiny_model, tmp_path)
    prompts = [tokenizer(f"Item {i}: hello there")["input_ids"] for i in range(12)]
    recording = RecordingModel(model)
    stop_ids, seeds = set(range(100, 130)), list(range(12))
    with torch.inference_mode():
        joined = sample(recording, prompts, 1, 1.0, 1.0, 10, stop_ids, lambda t: False, seeds, tokenizer.pad_token_id, max_rows=2)
        alone = [sample(model, [p], 1, 1.0, 1.0, 10, stop_ids, lambda t: False, [seed])[0] for p, seed in zip(prompts, seeds)]
    assert joined == alone
    assert len(recording.widths) > 30  # many steps and joins
    assert max(recording.widths) <= max(map(len, prompts)) + 2 * 10
