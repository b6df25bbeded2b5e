"""Batched sampling for the transformers backend, without the per-step waste of `generate`.

What `model.generate(num_return_sequences=n, top_p=...)` spends its time on, on a CPU with a 262k vocabulary:
- the prompt is copied n times before the forward pass, so a judge prompt of 600 tokens is computed k times;
- top-p sorts the whole vocabulary for every row at every step;
- finished rows keep being computed until the longest row ends, and stop strings are checked by decoding.

Here the prompts are computed once and their cache is repeated n times; the nucleus is found among the
top-K tokens (`top_p`); finished rows leave the batch, and waiting prompts take their places (continuous
batching). Each row draws its random numbers from
its own generator, seeded from the caller's seed and the row's place in the call (prompt index, sample
index), and the n-th token of a row uses the row's n-th number, so what a row samples does not depend on
which other rows share its batch or when it joined: batch size, sorting and early exits change nothing but
the speed (in float32; in bf16, rounding depends on a batch's shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from selfreward.engine.prefill import (
    MIN_SHARED_PREFIX,
    Prefix,
    compute_into,
    head_logits,
    last_layer_only_at,
    padded_batches,
    right_padded_pass,
    shared_prefix_length,
)
from selfreward.engine.top_p import row_uniforms, sample_tokens


def packed_order(keep: list[int]) -> list[int]:
    """The slots `keep` (ascending) packed into the first len(keep) slots by moving only kept slots from
    beyond them into the freed ones: which old slot each new slot holds. A reserved cache then copies at
    most as many rows as finished, not every row after the first that did."""
    kept, tail = set(keep), iter(slot for slot in keep if slot >= len(keep))
    return [slot if slot in kept else next(tail) for slot in range(len(keep))]


@dataclass
class _Decoding:
    """The rows being decoded: their cache (every row left-padded to the same stored length), attention mask
    (rows, stored length), last position (rows, 1), output row numbers, and the logits of their next token."""

    cache: object
    mask: torch.Tensor
    position: torch.Tensor
    rows: list[int]
    logits: torch.Tensor

    def step(self, model, tokens: list[int], keep: list[int]) -> "_Decoding":
        """The kept rows (slots of this batch) after `tokens` (one per slot): finished rows leave the batch."""
        device = self.mask.device
        next_tokens = torch.tensor(tokens, device=device).unsqueeze(-1)
        mask, position, rows = self.mask, self.position, self.rows
        if len(keep) < len(tokens):
            order = packed_order(keep)
            slots = torch.tensor(order, device=device)
            self.cache.batch_select_indices(slots)
            mask, position, next_tokens, rows = mask[slots], position[slots], next_tokens[slots], [rows[s] for s in order]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=-1)
        position = position + 1
        logits = model(
            input_ids=next_tokens, attention_mask=mask, position_ids=position, past_key_values=self.cache, use_cache=True,
        ).logits[:, -1, :]
        return _Decoding(self.cache, mask, position, rows, logits)


def _read_prompts(model, prompts: Sequence[Sequence[int]], members: list[int], n: int, capacity: int, pad_id: int) -> _Decoding:
    """n rows for each prompt of `members`, after one forward pass over them left-padded into a reserved
    cache of `capacity` positions (repeated for the n samples: each prompt is computed once)."""
    from selfreward.engine.kv_cache import reserved_cache

    device = model.device
    chosen = [prompts[i] for i in members]
    width = max(len(p) for p in chosen)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chosen], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chosen], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = reserved_cache(model.config, capacity)
    batch = torch.arange(len(chosen), device=device)
    with last_layer_only_at(model, batch, torch.full_like(batch, width - 1)):  # left-padded: the last column
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :]
    return _samples(cache, mask, positions[:, -1:], logits, members, n)


def _samples(cache, mask: torch.Tensor, position: torch.Tensor, logits: torch.Tensor, members: list[int], n: int) -> _Decoding:
    """The n sample rows of each prompt of `members`, from one row per prompt: the cache and the rest repeated."""
    cache.batch_repeat_interleave(n)
    return _Decoding(cache, mask.repeat_interleave(n, dim=0), position.repeat_interleave(n, dim=0),
                     [i * n + j for i in members for j in range(n)], logits.repeat_interleave(n, dim=0))


def _read_after(model, prefix: Prefix, prompts: Sequence[Sequence[int]], members: list[int], n: int,
                pad_id: int) -> tuple[_Decoding, list[int]]:
    """`_read_prompts` for prompts that all start with `prefix` (a judge's rubric), computed once per call:
    the rest of each prompt is read right-padded after a copy of its cache (`right_padded_pass`). Returns
    the rows, whose cache is right-padded, and each row's length: `kv_cache.left_padded_union` moves each
    row's positions to the right end of its row."""
    hidden, cache = right_padded_pass(model, [prompts[i] for i in members], pad_id, prefix)
    lengths = torch.tensor([len(prompts[i]) for i in members], device=hidden.device)
    width = int(lengths.max())
    mask = (torch.arange(width, device=hidden.device) >= width - lengths[:, None]).long()  # as if left-padded
    rows = _samples(cache, mask, lengths[:, None] - 1, head_logits(model, hidden).to(model.dtype), members, n)
    return rows, lengths.repeat_interleave(n).tolist()


def _admitted(model, live: _Decoding | None, prompts: Sequence[Sequence[int]], members: list[int], n: int,
              max_new_tokens: int, prefill_tokens: float, pad_id: int, joinable: bool, prefix: Prefix | None = None) -> _Decoding:
    """`live` (or nothing) joined by n rows for each prompt of `members`. The new prompts are read in passes
    padded to their own longest prompt; the caches of the passes and of the live rows are joined with every
    row at the right end of its row (`kv_cache.left_padded_union`), so the next steps decode them all."""
    from selfreward.engine.kv_cache import left_padded_union

    lengths = [len(prompts[i]) - (prefix.length if prefix else 0) for i in members]
    passes = padded_batches(lengths, len(members), prefill_tokens) if joinable else [list(range(len(members)))]
    if live is None and len(passes) == 1 and prefix is None:  # nothing to join: the pass's cache is the decoding cache
        return _read_prompts(model, prompts, members, n, max(lengths) + max_new_tokens, pad_id)
    parts, row_lengths = ([live], [None]) if live else ([], [])
    for chosen in passes:
        group = [members[i] for i in chosen]
        part, filled = (_read_after(model, prefix, prompts, group, n, pad_id) if prefix
                        else (_read_prompts(model, prompts, group, n, max(lengths[i] for i in chosen), pad_id), None))
        parts.append(part)
        row_lengths.append(filled)
    if live:  # columns that are padding in every live row (they left with finished rows) are not carried on
        live.mask = live.mask[:, live.mask.shape[-1] - int(live.mask.sum(-1).max()) :]
    width, places, start = max(part.mask.shape[-1] for part in parts), [], 0
    for part in parts:
        places.append(list(range(start, start + len(part.rows))))
        start += len(part.rows)
    cache = left_padded_union(model.config, [(where, part.cache, filled) for where, part, filled in zip(places, parts, row_lengths)],
                              start, width, width + max_new_tokens)
    mask = torch.cat([torch.nn.functional.pad(part.mask, (width - part.mask.shape[-1], 0)) for part in parts])
    return _Decoding(cache, mask, torch.cat([part.position for part in parts]), [row for part in parts for row in part.rows],
                     torch.cat([part.logits for part in parts]))


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: set[int],
    stopped: Callable[[list[int]], bool],
    seeds: Sequence[int],
    pad_id: int = 0,
    max_rows: int | None = None,
    prefill_tokens: float = float("inf"),
    join_when_free: float = 0.5,
) -> list[list[int]]:
    """`n` continuations of each prompt (token lists), in row-major order (prompt i's sample j is row
    i * n + j), each ending at its first stop token (included) or when `stopped(tokens)`.

    `seeds` holds one seed per output row. Each prompt is computed once; its cache serves its n samples.
    At most `max_rows` rows (default: all) are decoded together (continuous batching): prompts enter
    shortest first, and once finished rows have freed `join_when_free` of the rows (1: all of them, i.e.
    static batches), the next waiting prompts are read and join the rows still decoding, so a batch's
    tail of a few long rows does not run alone while prompts wait. Joining copies the live rows' cache.
    What all prompts start with (at least MIN_SHARED_PREFIX tokens: a judge's rubric) is computed once, and
    the rest of each prompt read after a copy of its cache. Prompts are read in passes of at most
    `prefill_tokens` tokens, padding included, each padded only to its own longest prompt (`padded_batches`).
    """
    from selfreward.engine.kv_cache import all_reserved, reserved_cache

    outputs: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    if max_new_tokens <= 0 or not outputs:
        return outputs
    uniforms = row_uniforms(seeds, max_new_tokens)
    max_rows = max(n, max_rows or len(outputs))
    joinable = all_reserved(reserved_cache(model.config, 1))  # else rows join only an empty batch
    waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # What every prompt starts with (a judge's rubric, a few-shot header) is computed once for the call.
    shared = shared_prefix_length(prompts) if joinable else 0
    prefix = Prefix(shared, reserved_cache(model.config, shared)) if shared >= MIN_SHARED_PREFIX else None
    if prefix:
        compute_into(model, prefix.cache, prompts[0][:shared], 0)
    live: _Decoding | None = None
    while True:
        free = max_rows - (len(live.rows) if live else 0)
        if waiting and (live is None or (joinable and free >= max(n, join_when_free * max_rows))):
            members, waiting = waiting[: free // n], waiting[free // n :]
            live = _admitted(model, live, prompts, members, n, max_new_tokens, prefill_tokens, pad_id, joinable, prefix)
        if live is None:
            return outputs
        steps = torch.tensor([len(outputs[row]) for row in live.rows])
        tokens = sample_tokens(live.logits, temperature, top_p, uniforms[torch.tensor(live.rows), steps]).tolist()
        keep = []
        for slot, (row, token) in enumerate(zip(live.rows, tokens)):
            outputs[row].append(token)
            if token not in stop_ids and not stopped(outputs[row]) and len(outputs[row]) < max_new_tokens:
                keep.append(slot)
        live = live.step(model, tokens, keep) if keep else None
