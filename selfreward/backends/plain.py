"""Plain transformers for the transformers backend: batched `generate`, one forward pass for next-token
probabilities. It uses only transformers' public API, so it runs wherever transformers runs; the CPU engine
(`selfreward.engine`) is the faster path where it was tested.

The records contract holds here too: each output row samples from its own random stream (`RowSampler`, a
logits processor), so batch sizes and shards change speed, not which tokens a row draws. The streams and
the top-p rule are the engine's (the n-th token of a row uses the n-th number of a generator seeded with the
row's seed; a token is kept while the mass ranked above it is below top-p), so the two paths mostly draw the
same tokens; not always, as their fp32 roundings differ and now and then move a nucleus boundary or a
draw across a token's edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniform numbers in [0, 1); row r depends only on seeds[r]."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(seed % (2**63)), dtype=torch.float64) for seed in seeds]
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (rows, vocab) logits: top-p at `temperature`, chosen by inverse transform of the
    row's uniform number over the kept tokens, most likely first."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    values, ids = probs.sort(dim=-1, descending=True)
    kept = values.masked_fill(values.cumsum(dim=-1) - values >= top_p, 0.0) if top_p < 1.0 else values
    cumulative = kept.double().cumsum(dim=-1)
    target = (uniforms.to(cumulative.device) * cumulative[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cumulative, target, right=True)
    choice = torch.minimum(choice, (kept > 0).sum(dim=-1, keepdim=True) - 1)
    return ids.gather(-1, choice).squeeze(-1)


class RowSampler(LogitsProcessor):
    """Draws every row's next token from the row's own stream and leaves only that token possible, so that
    `generate`'s greedy choice takes it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, steps: int) -> None:
        self.uniforms = row_uniforms(seeds, steps)
        self.temperature, self.top_p, self.step = temperature, top_p, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = sample_top_p(scores, self.temperature, self.top_p, self.uniforms[:, self.step])
        self.step += 1
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.unsqueeze(-1).to(scores.device), 0.0)


class StopWhen(StoppingCriteria):
    """Ends a row once `stopped(its new tokens)`: the backend's stop-string check."""

    def __init__(self, stopped: Callable[[list[int]], bool], prompt_width: int) -> None:
        self.stopped, self.prompt_width = stopped, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [self.stopped(row[self.prompt_width :].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _left_padded(model, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=model.device)
    return ids, mask


def sample(
    model, prompts: Sequence[Sequence[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
    stop_ids: set[int], stopped: Callable[[list[int]], bool], seeds: Sequence[int], max_rows: int,
) -> list[list[int]]:
    """`n` continuations of each prompt (token lists), row-major (prompt i's sample j is row i * n + j), in
    batches of at most `max_rows` rows; after a row ends its tokens are stop tokens (callers cut there)."""
    rows = [prompt for prompt in prompts for _ in range(n)]
    if not rows or max_new_tokens <= 0:
        return [[] for _ in rows]
    stops = sorted(stop_ids)
    outputs: list[list[int]] = []
    for start in range(0, len(rows), max_rows):
        batch = rows[start : start + max_rows]
        ids, mask = _left_padded(model, batch, stops[0] if stops else 0)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0)
        processors = LogitsProcessorList(
            [RowSampler(seeds[start : start + max_rows], temperature, top_p, max_new_tokens)] if temperature > 0 else [])
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors,
                                   stopping_criteria=StoppingCriteriaList([StopWhen(stopped, ids.shape[1])]))
        outputs += generated[:, ids.shape[1] :].tolist()
    return outputs


def next_token_probs(model, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], pad_id: int, max_rows: int) -> list[list[float]]:
    """The probability of each of `token_ids` as the next token after each prompt: one forward pass per
    batch of `max_rows` left-padded prompts, logits only at the last position."""
    index = torch.tensor(list(token_ids), device=model.device)
    probs: list[list[float]] = []
    for start in range(0, len(prompts), max_rows):
        ids, mask = _left_padded(model, prompts[start : start + max_rows], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1, :]
        probs += torch.softmax(logits.float(), dim=-1)[:, index].tolist()
    return probs
