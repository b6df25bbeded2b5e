"""Generation and next-token probabilities with transformers, on one of two paths:

- the CPU engine (`selfreward.engine`, `backend.cpu_engine`): n samples per prompt from one computation of
  each prompt, at most `batch_size` rows decoded together, waiting prompts joining as rows finish;
- plain transformers (`plain`): batched `generate`, one forward pass for next-token probabilities.

Both draw each output row from its own seed, so batch sizes and shards change speed, not records.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

from selfreward import engine
from selfreward.backends import plain
from selfreward.backends.base import Backend, Completion, Sampling, cut_at_stop, row_seed
from selfreward.models import load_causal_lm, load_tokenizer, stop_token_ids
from selfreward.precision import default_device, inference_dtype

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    def __init__(self, model_path: str, config, seed: int = 0, trust_remote_code: bool = False,
                 installed: dict[str, str] | None = None) -> None:
        """`installed` stands for the installed torch and transformers versions when the engine is chosen
        (tests pass others)."""
        self.device = default_device()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.dtype = inference_dtype(config.dtype, self.device)
        self.model = load_causal_lm(model_path, self.dtype, trust_remote_code, self.device).eval()
        self.engine = engine.choose(config.cpu_engine, self.model, self.device, installed)
        if self.engine:
            engine.install(self.model)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.batch_size = config.batch_size
        self.prefill_tokens = config.prefill_tokens
        self.seed = seed
        # Several batches' worth of prompts per call, so that waiting prompts take the places of finished rows.
        self.chunk_prompts = 4 * max(8, config.batch_size)

    @property
    def path(self) -> str:
        """Which path computes: "engine" or "plain" (kept in the stages' done records)."""
        return "engine" if self.engine else "plain"

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        import torch

        if sampling.temperature <= 0 and n > 1:  # greedy decoding gives n identical answers: compute one
            return [row * n for row in self.generate(prompts, 1, sampling)]
        # A row's seed comes from its prompt's place in this call, not from the rows it is decoded with.
        seeds = [row_seed(sampling.seed, i, j) for i in range(len(prompts)) for j in range(n)]
        encoded = [self.encode(p) for p in prompts]
        stopped = self._stop_string_check(sampling.stop)
        with torch.inference_mode():
            if self.engine:
                from selfreward.engine.decoding import sample

                rows = sample(self.model, encoded, n, sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                              self.stop_ids, stopped, seeds, pad_id=self.tokenizer.pad_token_id or 0,
                              max_rows=self.batch_size, prefill_tokens=self.prefill_tokens)
            else:
                rows = plain.sample(self.model, encoded, n, sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                    self.stop_ids, stopped, seeds, max_rows=self.batch_size)
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
        pad_id = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            if self.engine:
                from selfreward.engine.prefill import next_token_probs

                return next_token_probs(self.model, encoded, token_ids, pad_id, self.batch_size, self.prefill_tokens)
            return plain.next_token_probs(self.model, encoded, token_ids, pad_id, self.batch_size)

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
