"""Reading prompts: passes that compute what many prompts share once (a judge's rubric for a whole call, an
instruction for its responses) and project only the last positions through the LM head.

`next_token_probs` is the engine's expected-mode judging: the rubric common to the call is computed once,
each group of rows sharing more (the responses to one instruction) once more, and the rest of each row in
batches of about `prefill_tokens` tokens, padding included (`padded_batches`); the LM head reads all of its
weights once for many rows.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# What one more forward pass costs beyond its tokens (Python, per-layer calls, the copy of a shared prefix's
# cache), in tokens' worth of time: padding must save more than this before a batch is split. Measured on the
# 2-core CPU, the 270M model reads ~300-430 tokens/s at 1 to 16 rows a pass, so small batches lose little.
BATCH_OVERHEAD_TOKENS = 32


def padded_batches(lengths: Sequence[int], max_rows: int, max_tokens: float, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` sorted by length and cut into consecutive batches of at most `max_rows` rows and
    `max_tokens` tokens with padding (a longer row gets a batch of its own), choosing the cuts that
    minimise the tokens computed, padding included, plus `overhead` per batch (dynamic programming over
    the sorted rows: a length-sorted list cut greedily pads a short row to a long one at every jump)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cost = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = lengths[order[end - 1]]
        for begin in range(end - 1, -1, -1):
            rows = end - begin
            if rows > 1 and (rows > max_rows or rows * width > max_tokens):
                break
            total = cost[begin] + rows * width + overhead
            if total < cost[end]:
                cost[end], cut[end] = total, begin
    batches, end = [], len(order)
    while end:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


@contextmanager
def last_layer_only_at(model, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's last decoder layer computes its attention output projection and its MLP
    only at positions (rows[i], positions[i]): the only ones whose output anything reads when the LM head
    sees just them, or none (a pass that only fills the cache). The layer's keys and values, which the
    cache keeps, come before both and are computed everywhere; the layer's output at the other positions
    is meaningless and must not be read.

    Both parts act on each position alone, so the kept positions get what the whole layer gives them. For
    the 270M model the pair is ~2/3 of a layer's matmul FLOPs, and the last of 18 layers is ~4 % of a
    judging call's work. A model whose last layer lacks `self_attn.o_proj` or `mlp` runs unchanged."""
    layer = model.get_decoder().layers[-1]
    parts = [getattr(getattr(layer, "self_attn", None), "o_proj", None), getattr(layer, "mlp", None)]
    if any(part is None for part in parts):
        yield
        return
    shapes: dict[int, torch.Size] = {}

    def gather(module, args):
        shapes[id(module)] = args[0].shape
        return (args[0][rows, positions].unsqueeze(0), *args[1:])

    def scatter(module, args, output):
        full = output.new_zeros(*shapes[id(module)][:-1], output.shape[-1])
        full[rows, positions] = output[0]
        return full

    handles = [hook for part in parts for hook in (part.register_forward_pre_hook(gather), part.register_forward_hook(scatter))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# A common prefix shorter than this is computed with each row rather than once.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens that every row starts with, leaving at least one token of each row after them; none for a lone
    row, which shares nothing (computing it apart would only cost a second pass of one token)."""
    if len(rows) < 2:
        return 0
    shortest = min(len(row) for row in rows) - 1
    length = 0
    while length < shortest and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


@dataclass
class Prefix:
    """A computed start that rows share: its length and its cache, which `last_token_hidden` copies."""

    length: int
    cache: object


def compute_into(model, cache, tokens: Sequence[int], start: int) -> None:
    """Compute `tokens` (one row, positions from `start`) into `cache`."""
    device = model.device
    nowhere = torch.empty(0, dtype=torch.long, device=device)
    with last_layer_only_at(model, nowhere, nowhere):
        model.get_decoder()(
            input_ids=torch.tensor([list(tokens)], device=device), past_key_values=cache, use_cache=True,
            position_ids=torch.arange(start, start + len(tokens), device=device).unsqueeze(0),
        )


def _continued(model, prefix: Prefix | None) -> tuple[int, object]:
    """Where rows continuing `prefix` start, and a copy of its cache to continue (None: position 0, empty)."""
    from transformers import DynamicCache

    return (prefix.length, _copied(prefix.cache)) if prefix else (0, DynamicCache(config=model.config))


def _copied(cache):
    """`cache` with each layer's tensors copied and the rest shared. The rows continuing a prefix change
    only tensors; `copy.deepcopy` walked every attribute in Python, 2.5-3.3 ms a copy of the 270M model's
    cache against 0.45 (41 copies in judging the oasst1 sample)."""
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in copied.layers:
        for name, value in list(vars(layer).items()):
            if isinstance(value, torch.Tensor):
                setattr(layer, name, value.clone())
    return copied


def extended_prefix(model, prefix: Prefix | None, row: Sequence[int], length: int) -> Prefix:
    """`prefix` (None: nothing) continued with `row`'s tokens up to `length`, in a cache of its own."""
    start, cache = _continued(model, prefix)
    compute_into(model, cache, row[start:length], start)
    return Prefix(length, cache)


def prefix_groups(rows: Sequence[Sequence[int]], start: int, overhead: int) -> list[tuple[int, list[int]]]:
    """The rows as (shared length, row indices) groups whose members share more than their first `start`
    tokens: the responses to one instruction, after the judge's rubric. Sorted rows are grouped while
    neighbours share at least MIN_SHARED_PREFIX tokens more; a group is kept if the tokens it computes once
    instead of per row, (members - 1) x (shared - start), outweigh `overhead` (the forward passes of a
    group of its own). The other rows form one group at `start`, listed last."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    runs: list[tuple[int, list[int]]] = []
    for previous, index in zip([None] + order, order):
        common = shared_prefix_length([rows[previous], rows[index]]) if previous is not None else 0
        if runs and common - start >= MIN_SHARED_PREFIX:
            runs[-1] = (min(runs[-1][0], common), runs[-1][1] + [index])
        else:
            runs.append((len(rows[index]), [index]))
    groups, rest = [], []
    for shared, members in runs:
        if len(members) > 1 and (len(members) - 1) * (shared - start) > overhead:
            groups.append((shared, sorted(members)))
        else:
            rest += members
    return groups + ([(start, sorted(rest))] if rest else [])


def prefix_plan(rows: Sequence[Sequence[int]], overhead: int) -> tuple[int, list[tuple[int, list[int]]]]:
    """What to compute once: the start of all rows (a judge rubric; 0 if shorter than MIN_SHARED_PREFIX),
    and the `prefix_groups` past it."""
    start = shared_prefix_length(rows)
    start = start if start >= MIN_SHARED_PREFIX else 0
    return start, prefix_groups(rows, start, overhead)


def planned_tokens(rows: Sequence[Sequence[int]], start: int, groups: list[tuple[int, list[int]]]) -> int:
    """Tokens that a `prefix_plan` computes: the start once, each group's shared part once, the rest per row."""
    return start + sum(length - start + sum(len(rows[i]) - length for i in members) for length, members in groups)


def last_token_hidden(model, rows: Sequence[Sequence[int]], pad_id: int, prefix: Prefix | None = None) -> torch.Tensor:
    """(rows, hidden) final hidden state after each token list, from one forward pass; `head_logits` turns
    it into next-token logits (callers with many batches apply the LM head once, to all of them).

    Every row continues from a copy of `prefix` if given (from `extended_prefix`, so a rubric common to many
    batches is computed once); what the rows of this batch share beyond it is computed once more and its
    cache shared; the rest of each row follows right-padded, so every real token sits at its true position
    and never sees padding. The last layer works past attention only at each row's last real position.
    """
    return right_padded_pass(model, rows, pad_id, prefix)[0]


def right_padded_pass(model, rows: Sequence[Sequence[int]], pad_id: int, prefix: Prefix | None = None) -> tuple[torch.Tensor, object]:
    """`last_token_hidden`, and the cache the pass filled: row r's positions 0 to len(rows[r]) - 1 hold its
    tokens' keys and values, padding after them."""
    device = model.device
    start, cache = _continued(model, prefix)
    shared = shared_prefix_length(rows)
    if shared - start >= MIN_SHARED_PREFIX:
        compute_into(model, cache, rows[0][start:shared], start)
        start = shared
    if start:
        cache.batch_repeat_interleave(len(rows))
    lengths = [len(row) - start for row in rows]
    width = max(lengths)
    suffix = torch.tensor([list(row[start:]) + [pad_id] * (width - length) for row, length in zip(rows, lengths)], device=device)
    attention_mask = torch.ones(len(rows), start + width, dtype=torch.long, device=device)
    for r, length in enumerate(lengths):
        attention_mask[r, start + length :] = 0
    positions = torch.arange(start, start + width, device=device).expand(len(rows), -1)
    batch, last = torch.arange(len(rows), device=device), torch.tensor(lengths, device=device) - 1
    with last_layer_only_at(model, batch, last):
        hidden = model.get_decoder()(input_ids=suffix, attention_mask=attention_mask, position_ids=positions,
                                     past_key_values=cache, use_cache=True).last_hidden_state
    return hidden[batch, last], cache


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) float32 logits of (rows, hidden) final hidden states: the LM head, then the model's
    final soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# Rows per LM-head call in `next_token_probs` (their float32 logits: 256 x 262k x 4 bytes = 256 MiB).
HEAD_ROWS = 256
# A group of rows with a prefix of their own costs its prefix's pass and a batch more.
PREFIX_GROUP_OVERHEAD_TOKENS = 2 * BATCH_OVERHEAD_TOKENS


def next_token_probs(model, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], pad_id: int, max_rows: int,
                     prefill_tokens: float) -> list[list[float]]:
    """The probability of each of `token_ids` as the next token after each prompt (token lists)."""
    if not prompts:
        return []
    index = torch.tensor(list(token_ids), device=model.device)
    # The rubric, computed once for the whole call; then each instruction judged more than once, computed
    # once for its responses.
    start, groups = prefix_plan(prompts, PREFIX_GROUP_OVERHEAD_TOKENS)
    call = extended_prefix(model, None, prompts[0], start) if start else None
    hidden: list[torch.Tensor | None] = [None] * len(prompts)
    for length, members in groups:
        prefix = extended_prefix(model, call, prompts[members[0]], length) if length > start else call
        lengths = [len(prompts[i]) - length for i in members]
        for batch in padded_batches(lengths, max_rows, prefill_tokens):
            rows = [members[i] for i in batch]
            for row, state in zip(rows, last_token_hidden(model, [prompts[i] for i in rows], pad_id, prefix)):
                hidden[row] = state
    # The LM head reads all of its weights per call: once for many rows, not once per small batch.
    stacked = torch.stack(hidden)
    return [values for chunk in stacked.split(HEAD_ROWS)
            for values in torch.softmax(head_logits(model, chunk), dim=-1)[:, index].tolist()]
