from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

# How many of the most likely next tokens vLLM and OpenAI-compatible servers report log-probabilities for
# (`next_token_probs` reads the judge's six score tokens among them; servers commonly cap it at 20).
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    # Generation ends at the first of these strings; the string itself is returned only with keep_stop.
    stop: tuple[str, ...] = ()
    keep_stop: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    # False when generation hit max_new_tokens before a stop token or stop string.
    finished: bool


def cut_at_stop(text: str, sampling: Sampling) -> tuple[str, bool]:
    """Text up to the first stop string (through it with keep_stop), and whether one was found."""
    found = [(index, s) for s in sampling.stop if (index := text.find(s)) >= 0]
    if not found:
        return text, False
    index, stop = min(found)
    return text[: index + len(stop) if sampling.keep_stop else index], True


class Backend(ABC):
    tokenizer: object
    # How many prompts a caller should submit per call: large enough to keep the backend busy, small
    # enough that results reach disk (and survive a crash) every few seconds to minutes.
    chunk_prompts: int = 64
    # What computes, for the done records: "engine" or "plain" (transformers), "vllm", "http".
    path: str = "custom"

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render a conversation with the model's chat template, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def text_prompt(self, text: str) -> str:
        """A raw completion prompt: the text after the model's BOS token (if it uses one)."""
        bos = self.tokenizer.bos_token if getattr(self.tokenizer, "add_bos_token", True) else None
        return (bos or "") + text

    def encode(self, prompt: str) -> list[int]:
        # Rendered prompts already carry BOS, so the tokenizer must not add another.
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def single_token_ids(self, context: str, candidates: Sequence[str]) -> list[int] | None:
        """Token id of each candidate as the one token that follows `context`, or None if any is not."""
        base = self.encode(context)
        ids = []
        for candidate in candidates:
            extended = self.encode(context + candidate)
            if len(extended) != len(base) + 1 or extended[: len(base)] != base:
                return None
            ids.append(extended[-1])
        return ids

    @abstractmethod
    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        """`n` completions for every prompt, in prompt order."""

    @abstractmethod
    def next_token_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        """Probability of each of `token_ids` as the next token after each prompt."""

    def close(self) -> None:
        """Free the model (and the accelerator) before another stage loads one."""


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of one output row: sample `sample` of the call's prompt number `prompt`."""
    digest = hashlib.sha256(f"{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
