"""Attention for grouped-query models on a CPU: the query heads that share a key/value head are computed as
that head's queries.

With grouped-query attention (Gemma 3 270M: 4 query heads, 1 key/value head) transformers' `sdpa` hands
PyTorch (rows, heads, queries) and lets the kernel broadcast, or copy, the key/value head. PyTorch's CPU
flash-attention kernel works through (row, head, query block) tiles of small matrix products, far below the
rate of a square matmul, and attention was over a quarter of the 270M model's decoding and judging profiles
(benchmarks/RESULTS.md).

- A decoding step (one query per row) gives the kernel a single query per tile. The G query heads of a
  key/value head attend over the same keys and values with the same mask, so they are read as G query
  positions of that one head: one SDPA call, one tile per (row, key/value head), about ten times faster.
- A prompt's forward pass (many queries, a mask) is computed as two batched matrix products per slice of
  rows and of their queries whose scores stay within a couple of MiB, each product reading all G query
  heads of a key/value head at once. Equal blocks of at most 128 queries skip the keys past their causal
  reach. About half the time of `sdpa` at 60 to 1,200 queries a row (benchmarks/RESULTS.md).
- The scores stay in the model's dtype, as the product writes them: the query is scaled before the
  product (exact when the scale is a power of two, as Gemma 3's 1/16 is; otherwise one rounding, as
  transformers' `eager` attention has when it scales bf16 scores), the mask is filled in, and PyTorch's
  softmax, which works in fp32 inside, writes the probabilities in that dtype. Casting the scores to fp32,
  scaling, masking, a softmax and a cast back were five passes over four-byte values, twice the time for the
  same output; the probabilities differ
  from a cast fp32 softmax by at most a unit in the last place of a value near zero (1.2e-7).

Everything else (no mask, so `is_causal`; dropout; attention with a position bias or a paged cache; a model
whose heads are not grouped) stays with transformers' `sdpa`. On a GPU, whose SDPA kernels are another
matter, the backend leaves `sdpa` as it is.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The name under which transformers finds this attention (and builds its masks the way sdpa's are built).
GROUPED_ATTENTION = "selfreward_grouped_attention"

# Scores computed at once by the prompt path, in elements: 512 Ki fp32 values are 2 MiB, near a core's
# share of cache (chosen by the microbenchmarks above: 4x this was up to 1.7x slower at 300 queries).
SCORES_PER_SLICE = 1 << 19
# Queries of one row computed at once when a prompt is longer than this.
QUERY_BLOCK = 128


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (rows, heads, queries, dim) query, (rows, kv heads,
    keys, dim) key and value; returns (rows, queries, heads, dim), as `sdpa_attention_forward` does."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    plain = (kv_heads == heads or dropout or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
             or (queries > 1 and (attention_mask is None or attention_mask.dtype != torch.bool)))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if queries > 1:
        return sliced_attention(query, key, value, attention_mask, scaling if scaling is not None else dim**-0.5,
                                window=kwargs.get("sliding_window")), None
    # Query head h reads key/value head h // groups (transformers' repeat_kv), so the heads of one group are
    # consecutive: (rows, heads, 1, dim) -> (rows, kv heads, groups, dim). A decoding mask is (rows, 1, 1,
    # keys) and broadcasts over the group's queries.
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def sliced_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
                     scores_per_slice: int = SCORES_PER_SLICE, query_block: int = QUERY_BLOCK,
                     window: int | None = None) -> torch.Tensor:
    """Masked attention of many queries (`mask`: True = may attend, (rows or 1, 1, queries, keys)), in
    slices of rows and of their queries whose scores fit in `scores_per_slice`.

    The queries are cut into equal blocks of at most `query_block` (135 queries are two blocks of 68, not
    128 and 7), and a slice of a block's queries reads only the keys up to the last one any of them may
    see: in a causal prompt after `keys - queries` cached positions, that skips most of the masked half of
    the prompt's own keys. With a sliding `window` (a query sees its own key and the `window - 1` before
    it, as transformers' sliding-window layers do), the slice also starts at the first key its first query
    may see, which saves a third of a long row's attention. Each
    bound is checked against the mask before it is used, so a mask that allows more keeps them all. As
    many rows as fit share each product."""
    rows, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    output = query.new_empty(rows, queries, heads, dim)
    lowest = torch.finfo(query.dtype).min  # not -inf: a row with nothing to attend to stays finite
    blocks = -(-queries // query_block)
    query_step = max(1, min(-(-queries // blocks), scores_per_slice // (heads * keys)))
    row_step = max(1, scores_per_slice // (heads * query_step * keys))
    for start in range(0, queries, query_step):
        end = min(queries, start + query_step)
        reach = keys - queries + end  # causal: these queries see no key after their own positions
        low = max(0, keys - queries + start - window + 1) if window else 0  # nor one before the first one's window
        for first in range(0, rows, row_step):
            last = min(rows, first + row_step)
            count, span = last - first, end - start
            seen = (mask[first:last] if mask.shape[0] > 1 else mask)[:, :, start:end]
            width = reach if reach < keys and not seen[..., reach:].any() else keys
            lo = low if low and not seen[..., :low].any() else 0
            # Scaled into a contiguous block (one pass: the model's query is a transposed view).
            grouped = torch.mul(query[first:last, :, start:end], scale, out=query.new_empty(count, heads, span, dim))
            grouped = grouped.view(count, kv_heads, groups * span, dim)
            scores = torch.matmul(grouped, key[first:last, :, lo:width].transpose(-1, -2))
            scores = scores.view(count, kv_heads, groups, span, width - lo).masked_fill_(~seen[:, :, None, :, lo:width], lowest)
            probs = torch.softmax(scores, dim=-1).view(count, kv_heads, groups * span, width - lo)
            output[first:last, start:end] = torch.matmul(probs, value[first:last, :, lo:width]).view(count, heads, span, dim).transpose(1, 2)
    return output


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)


def use_grouped_attention(model) -> bool:
    """Switch a CPU model loaded with `sdpa` attention to `grouped_attention`; returns whether it did (a
    model on a GPU, or on another attention implementation, eager or flash, is left as it is)."""
    if model.config._attn_implementation != "sdpa" or model.device.type != "cpu":
        return False
    model.set_attn_implementation(GROUPED_ATTENTION)
    return True
