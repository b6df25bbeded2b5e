"""Decoding attention for grouped-query models: the query heads that share a key/value head are computed
as that head's queries, in one kernel call.

In a decoding step every row has one query per head. With grouped-query attention (Gemma 3 270M: 4 query
heads, 1 key/value head) transformers' `sdpa` hands PyTorch (rows, heads, 1 query) and lets the kernel
broadcast the key/value head. PyTorch's CPU flash-attention kernel works through (row, head, query block)
tiles, and with a single query per tile it spends its time on the tiles, not on arithmetic: on the 2-core
Zen 4 CPU (bf16, 64 rows, head dim 256) one call took 3.4 ms at 40 cached positions and 55 ms at 700, so
attention was 27 % of a 64-row decoding profile of the 270M model, and most of a sampled judgment, whose
prompts run to hundreds of tokens. The G query heads of a key/value head attend over the same keys and
values with the same mask, so they can be read as G query positions of that one head: the same attention,
one tile per (row, key/value head), 0.35 ms and 6 ms for the same calls (/tmp microbenchmark of Dec 3,
figures in DEVELOPERS.md).

Only decoding steps (one query position) take this path; a prompt's prefill, where the kernel's tiles are
full, stays with transformers' `sdpa`, as do models without grouped heads.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The name under which transformers finds this attention (and builds its masks the way sdpa's are built).
GROUPED_DECODING = "selfreward_grouped_decoding"


def grouped_decoding_attention(
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
    if queries != 1 or kv_heads == heads or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # Query head h reads key/value head h // groups (transformers' repeat_kv), so the heads of one group are
    # consecutive: (rows, heads, 1, dim) -> (rows, kv heads, groups, dim). A decoding mask is (rows, 1, 1,
    # keys) and broadcasts over the group's queries.
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_DECODING, grouped_decoding_attention)
AttentionMaskInterface.register(GROUPED_DECODING, sdpa_mask)


def use_grouped_decoding(model) -> bool:
    """Switch a model loaded with `sdpa` attention to `grouped_decoding_attention`; returns whether it did
    (a model on another attention implementation, eager or flash, is left as it is)."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(GROUPED_DECODING)
    return True
