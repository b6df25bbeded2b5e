"""Batched generation with transformers: n samples per prompt from one computation of each prompt, at most
`batch_size` rows decoded together, waiting prompts joining the batch as rows finish (`decoding.sample`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

from selfreward.backends.attention import use_grouped_attention
from selfreward.backends.base import Backend, Completion, Sampling, cut_at_stop, row_seed
from selfreward.backends.decoding import (
    BATCH_OVERHEAD_TOKENS, extended_prefix, head_logits, last_token_hidden, padded_batches, prefix_plan, sample,
)
from selfreward.backends.norms import use_inplace_norms
from selfreward.backends.onednn import use_onednn
from selfreward.models import load_causal_lm, load_tokenizer, stop_token_ids
from selfreward.precision import default_device, inference_dtype

log = logging.getLogger(__name__)


# Rows per LM-head call in `next_token_probs` (their float32 logits: 256 x 262k x 4 bytes = 256 MiB).
HEAD_ROWS = 256
# A group of rows with a prefix of their own costs its prefix's pass and a batch more.
PREFIX_GROUP_OVERHEAD_TOKENS = 2 * BATCH_OVERHEAD_TOKENS


class TransformersBackend(Backend):
    def __init__(self, model_path: str, config, seed: int = 0, trust_remote_code: bool = False) -> None:
        self.device = default_device()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.dtype = inference_dtype(config.dtype, self.device)
        self.model = load_causal_lm(model_path, self.dtype, trust_remote_code, self.device).eval()
        use_grouped_attention(self.model)
        use_onednn(self.model)
        use_inplace_norms(self.model)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.batch_size = config.batch_size
        self.prefill_tokens = config.prefill_tokens
        self.seed = seed
        # Several batches' worth of prompts per call, so that waiting prompts take the places of finished rows.
        self.chunk_prompts = 4 * max(8, config.batch_size)

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        import torch

        if sampling.temperature <= 0 and n > 1:  # greedy decoding gives n identical answers: compute one
            return [row * n for row in self.generate(prompts, 1, sampling)]
        # A row's seed comes from its prompt's place in this call, not from the rows it is decoded with.
        seeds = [row_seed(sampling.seed, i, j) for i in range(len(prompts)) for j in range(n)]
        with torch.inference_mode():
            rows = sample(
                self.model, [self.encode(p) for p in prompts], n, sampling.temperature, sampling.top_p,
                sampling.max_new_tokens, self.stop_ids, self._stop_string_check(sampling.stop), seeds,
                pad_id=self.tokenizer.pad_token_id or 0, max_rows=self.batch_size, prefill_tokens=self.prefill_tokens,
            )
        return [[self._completion(tokens, sampling) for tokens in rows[i * n : (i + 1) * n]] for i in range(len(prompts))]

    def _stop_string_check(self, stops: Sequence[str]):
        """Whether a row's tokens end in one of `stops`: only the last few tokens are decoded per step."""
        if not stops:
            return lambda tokens: False
        span = max(len(s) for s in stops) + 1  # a token carries at least one character of a stop string

        def stopped(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-span:], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return stopped

    def _completion(self, tokens: list[int], sampling: Sampling) -> Completion:
        length, stopped = len(tokens), False
        for position, token in enumerate(tokens):
            if token in self.stop_ids:
                length, stopped = position, True
                break
        text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
        text, cut = cut_at_stop(text, sampling)
        return Completion(text=text.strip(), tokens=length, finished=stopped or cut)

    def next_token_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        import torch

        encoded = [self.encode(p) for p in prompts]
        if not encoded:
            return []
        index = torch.tensor(list(token_ids), device=self.device)
        with torch.inference_mode():
            # The rubric, computed once for the whole call; then each instruction judged more than once,
            # computed once for its responses.
            start, groups = prefix_plan(encoded, PREFIX_GROUP_OVERHEAD_TOKENS)
            call = extended_prefix(self.model, None, encoded[0], start) if start else None
            hidden = [None] * len(encoded)
            for length, members in groups:
                prefix = extended_prefix(self.model, call, encoded[members[0]], length) if length > start else call
                lengths = [len(encoded[i]) - length for i in members]
                for batch in padded_batches(lengths, self.batch_size, self.prefill_tokens):
                    rows = [members[i] for i in batch]
                    for row, state in zip(rows, last_token_hidden(self.model, [encoded[i] for i in rows], self.tokenizer.pad_token_id or 0, prefix)):
                        hidden[row] = state
            # The LM head reads all of its weights per call: once for many rows, not once per small batch.
            stacked = torch.stack(hidden)
            return [values for chunk in stacked.split(HEAD_ROWS)
                    for values in torch.softmax(head_logits(self.model, chunk), dim=-1)[:, index].tolist()]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
