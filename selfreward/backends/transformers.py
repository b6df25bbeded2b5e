"""Batched generation with transformers: left padding, prompts sorted by length, n samples per prompt."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

from selfreward.backends.base import Backend, Completion, Sampling, cut_at_stop
from selfreward.models import load_causal_lm, load_tokenizer, stop_token_ids

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    def __init__(self, model_path: str, config, seed: int = 0, trust_remote_code: bool = False) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model_path, config.dtype, trust_remote_code, self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.batch_size = config.batch_size
        self.seed = seed
        self.chunk_prompts = max(8, config.batch_size)

    def _batches(self, prompts: Sequence[str], per_batch: int):
        encoded = [self.encode(p) for p in prompts]
        # Sorting by length keeps padding (wasted compute) small inside each batch.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), per_batch):
            indices = order[start : start + per_batch]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in indices]}, padding=True, return_tensors="pt"
            ).to(self.device)
            yield indices, batch

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        import torch

        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        if not sample and n > 1:  # greedy decoding gives n identical answers: compute one
            return [row * n for row in self.generate(prompts, 1, sampling)]
        results: list[list[Completion]] = [[] for _ in prompts]
        per_batch = max(1, self.batch_size // n)
        for indices, batch in self._batches(prompts, per_batch):
            with torch.inference_mode():
                output = self.model.generate(
                    **batch,
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=sampling.top_p if sample else None,
                    top_k=None,
                    max_new_tokens=sampling.max_new_tokens,
                    num_return_sequences=n,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stop_strings=list(sampling.stop) or None,
                    tokenizer=self.tokenizer if sampling.stop else None,
                )
            new = output[:, batch["input_ids"].shape[1] :].tolist()
            for row, tokens in enumerate(new):
                results[indices[row // n]].append(self._completion(tokens, sampling))
        return results

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

        results: list[list[float]] = [[] for _ in prompts]
        index = torch.tensor(list(token_ids), device=self.device)
        for indices, batch in self._batches(prompts, self.batch_size):
            with torch.inference_mode():
                # Only the last position's logits: the full (batch, length, vocab) tensor is tens of GB
                # for long prompts with a 262k vocabulary.
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, index].tolist()
            for row, values in enumerate(probs):
                results[indices[row]] = values
        return results

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
