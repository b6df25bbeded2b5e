"""Batched sampling for the transformers backend, without the per-step waste of `generate`.

What `model.generate(num_return_sequences=n, top_p=...)` spends its time on, on a CPU with a 262k vocabulary:
- the prompt is copied n times before the forward pass, so a judge prompt of 600 tokens is computed k times;
- top-p sorts the whole vocabulary for every row at every step;
- finished rows keep being computed until the longest row ends, and stop strings are checked by decoding.

Here the prompts are computed once and their cache is repeated n times; the nucleus is found among the
top-K tokens (K grows until the nucleus fits, so the kept set is exactly top-p's); finished rows leave the
batch, and waiting prompts take their places (continuous batching). Each row draws its random numbers from
its own generator, seeded from the caller's seed and the row's place in the call (prompt index, sample
index), and the n-th token of a row uses the row's n-th number, so what a row samples does not depend on
which other rows share its batch or when it joined: batch size, sorting and early exits change nothing but
the speed (in float32; in bf16, rounding depends on a batch's shapes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Candidates examined first when looking for the top-p nucleus; grown 8x while the nucleus does not fit.
FIRST_K = 64


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniform numbers in [0, 1); row r depends only on seeds[r]."""
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed % (2**63))
        rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


def top_candidates(values: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(values, k)` over the last dimension, faster for a wide vocabulary on a CPU.

    The k largest values lie in the k blocks with the largest maxima (a block holding one of them has a
    maximum at least as large as the k-th value, and at most k blocks do), so a pass of block maxima and a
    top-k among k blocks replace a top-k over the whole vocabulary.
    """
    rows, width = values.shape
    if width % block or width // block <= k:
        return torch.topk(values, k, dim=-1)
    blocks = values.view(rows, width // block, block)
    chosen = torch.topk(blocks.amax(dim=-1), k, dim=-1).indices
    gathered = blocks.gather(1, chosen.unsqueeze(-1).expand(-1, -1, block)).view(rows, k * block)
    top, where = torch.topk(gathered, k, dim=-1)
    return top, chosen.gather(-1, where // block) * block + where % block


def log_normaliser(logits: torch.Tensor, temperature: float, row_max: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(rows, 1) log of the softmax denominator of `logits / temperature`, in float32.

    Computed over column chunks in one reused float32 buffer (the subtraction of the row maximum is also the
    cast): the temporaries stay in cache instead of several full (rows, vocab) float32 tensors, whose memory
    traffic is most of a decoding step's sampling cost with a 262k vocabulary. On a GPU, one `logsumexp`
    (memory traffic is cheap there; launches are not).
    """
    if logits.device.type != "cpu":  # a GPU reads memory fast enough; one kernel beats 4 launches per chunk
        return torch.logsumexp(logits.float() / temperature, dim=-1, keepdim=True)
    total = torch.zeros(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
    buffer = torch.empty(logits.shape[0], min(chunk, logits.shape[-1]), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[-1], chunk):
        part = logits[:, start : start + chunk]
        shifted = buffer[:, : part.shape[-1]]
        torch.sub(part, row_max, out=shifted)
        total += shifted.mul_(1.0 / temperature).exp_().sum(dim=-1, keepdim=True)
    return row_max / temperature + total.log()


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over (rows, vocab) logits at `temperature`: (token ids, kept probabilities) per row, best first,
    padded with zero probability. A token is kept when the mass of the tokens ranked above it is below
    `top_p` (the rule of transformers' top-p warper), so at least one token is always kept. Only the
    candidates are sorted; the whole vocabulary is read twice (block maxima, normaliser).

    The candidate set grows row by row: most rows' nuclei hold a few tokens, and a row whose nucleus holds
    thousands (a flat distribution) must not make every other row of the batch sort thousands too.
    """
    rows, vocab = logits.shape
    top, ids = top_candidates(logits, min(FIRST_K, vocab))
    log_z = log_normaliser(logits, temperature, top[:, :1].float())
    values = torch.exp(top.float() / temperature - log_z)
    where = torch.arange(rows, device=logits.device)
    while ids.shape[-1] < vocab:
        where = where[values[where].sum(dim=-1) < top_p]  # rows whose nucleus is not inside their candidates
        if not len(where):
            break
        top, wider = top_candidates(logits[where], min(vocab, ids.shape[-1] * 8))
        pad = wider.shape[-1] - ids.shape[-1]  # every row widens to the new width; only `where` gets new candidates
        ids = torch.nn.functional.pad(ids, (0, pad)).index_copy(0, where, wider)
        wider_values = torch.exp(top.float() / temperature - log_z[where])
        values = torch.nn.functional.pad(values, (0, pad)).index_copy(0, where, wider_values)
    before = values.cumsum(dim=-1) - values
    return ids, values.masked_fill(before >= top_p, 0.0)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (rows, vocab) logits: greedy at temperature 0, else top-p sampling by inverse
    transform of the row's uniform number."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if top_p < 1.0:
        ids, kept = nucleus(logits, temperature, top_p)
    else:
        kept, ids = torch.softmax(logits.float() / temperature, dim=-1), None
    cumulative = kept.double().cumsum(dim=-1)
    # The uniform numbers are drawn on the CPU (the same stream on every device) and move to the logits' device.
    target = (uniforms.to(cumulative.device, cumulative.dtype) * cumulative[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cumulative, target, right=True).clamp(max=kept.shape[-1] - 1)
    if ids is None:
        return choice.squeeze(-1)
    # Never land on the zero-probability tail of a nucleus (possible only through rounding).
    choice = torch.minimum(choice, (kept > 0).sum(dim=-1, keepdim=True) - 1)
    return ids.gather(-1, choice).squeeze(-1)


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
    from selfreward.backends.kv_cache import reserved_cache

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
    from selfreward.backends.kv_cache import left_padded_union

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
    from selfreward.backends.kv_cache import all_reserved, reserved_cache

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
        _extend(model, prefix.cache, prompts[0][:shared], 0)
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


def _extend(model, cache, tokens: Sequence[int], start: int) -> None:
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
    _extend(model, cache, row[start:length], start)
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
        _extend(model, cache, rows[0][start:shared], start)
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

