"""Policy agreement with humans, without a judge: the DPO policy's implicit reward as a classifier of human
preference pairs (as RewardBench scores DPO models).

DPO trains M_{t+1} so that r(x, y) = beta * [log pi(y | x) - log pi_ref(y | x)], with M_t as pi_ref, is
higher for chosen answers than for rejected ones. On held-out human pairs, the share where
r(chosen) > r(rejected) says whether the iteration moved the policy toward what humans prefer, with no
judge's bias in between. Beta scales every reward alike, so the accuracy does not depend on it. Equal
rewards count half; a model against itself as reference gives equal rewards everywhere: 50 %.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from selfreward.data.preferences import load_pairs, load_ranked
from selfreward.data.seeds import unseen
from selfreward.errors import UserError
from selfreward.progress import progress_bar

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class HumanPair:
    instruction: str
    chosen: str
    rejected: str


def human_pairs(ranked: Path | None, pairs: Path | None, limit: int | None, exclude: frozenset[str] = frozenset()) -> list[HumanPair]:
    """Every (better, worse) pair of differently ranked responses of the first `limit` ranked prompts, then
    the first `limit` chosen/rejected pairs; prompts whose instruction is in `exclude` (the seed
    instructions, `selfreward.data.seeds.normal` form) left out first, as judge agreement does."""
    found: list[HumanPair] = []
    if ranked:
        for prompt in unseen(load_ranked(ranked), exclude)[0][:limit]:
            for i, j in combinations(range(len(prompt.ranks)), 2):
                if prompt.ranks[i] != prompt.ranks[j]:
                    better, worse = (i, j) if prompt.ranks[i] < prompt.ranks[j] else (j, i)
                    found.append(HumanPair(prompt.instruction, prompt.responses[better], prompt.responses[worse]))
    if pairs:
        found += [HumanPair(p.instruction, p.chosen, p.rejected) for p in unseen(load_pairs(pairs), exclude)[0][:limit]]
    if not found:
        raise UserError(f"{ranked or pairs}: no human preference pairs (ranked prompts need responses of different ranks)")
    return found


def completion_logprobs(model, tokenizer, instruction: str, responses: Sequence[str], max_length: int) -> list[float]:
    """log pi(response | instruction) of each response as the assistant's answer in the chat template: the
    sum of its tokens' log-probabilities, computed only at the response's positions. Rows longer than
    `max_length` tokens keep their start (as DPO's training truncates)."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    values = []
    for response in responses:
        full = tokenizer.apply_chat_template([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
                                             tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        if ids[: len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids):
            values.append(float("nan"))  # the template does not render the prompt as a prefix, or no room left
            continue
        answer = len(ids) - len(prompt_ids)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=answer + 1).logits[0, :-1].float()
        targets = torch.tensor(ids[-answer:], device=logits.device)
        values.append(float(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()))
    return values


def pair_logprobs(model, tokenizer, pairs: Sequence[HumanPair], max_length: int, label: str) -> list[list[float]]:
    """[log pi(chosen | x), log pi(rejected | x)] per pair."""
    found = []
    with progress_bar(label, len(pairs)) as advance:
        for pair in pairs:
            found.append(completion_logprobs(model, tokenizer, pair.instruction, [pair.chosen, pair.rejected], max_length))
            advance()
    return found


def pairs_digest(pairs: Sequence[HumanPair], max_length: int) -> str:
    """What a stored set of log-probabilities was computed on: the pairs and the length limit."""
    return hashlib.sha256(json.dumps([max_length] + [[p.instruction, p.chosen, p.rejected] for p in pairs]).encode()).hexdigest()[:16]


def agreement(rewards: Sequence[tuple[float, float]], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Accuracy in percent (ties half) over the pairs whose rewards are defined, with a seeded 95 % bootstrap
    CI and n; pairs whose rewards could not be computed are counted apart."""
    import numpy as np

    known = [(c, r) for c, r in rewards if c == c and r == r]  # NaN: not computable
    outcome = np.asarray([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in known])
    result: dict[str, Any] = {"n": len(known), "not_computable": len(rewards) - len(known),
                              "ties": int((outcome == 0.5).sum()), "accuracy": None, "accuracy_ci": None,
                              "mean_margin": None}
    if len(known):
        means = outcome[np.random.default_rng(seed).integers(0, len(known), size=(samples, len(known)))].mean(axis=1)
        result.update(accuracy=round(100 * float(outcome.mean()), 2),
                      accuracy_ci=[round(100 * float(np.percentile(means, 2.5)), 2), round(100 * float(np.percentile(means, 97.5)), 2)],
                      mean_margin=round(float(np.mean([c - r for c, r in known])), 4))
    return result


def evaluate_policy(model_path: str, reference_path: str, pairs: Sequence[HumanPair], max_length: int = 1024,
                    seed: int = 0, trust_remote_code: bool = False, reference_logprobs: list[list[float]] | None = None) -> dict[str, Any]:
    """Policy agreement of `model_path` against `reference_path` (its DPO reference, M_t) on `pairs`.
    `reference_logprobs`: the reference's log-probabilities of the same pairs, if already computed (the
    loop keeps M_t's from the iteration before, where M_t was the policy); the result keeps both sides'."""
    from selfreward.models import load_causal_lm, load_tokenizer
    from selfreward.precision import default_device

    started = time.perf_counter()
    device = default_device()
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_causal_lm(model_path, "float32", trust_remote_code, device).eval()
    policy = pair_logprobs(model, tokenizer, pairs, max_length, "policy agreement: M_{t+1}")
    if reference_logprobs is None:
        reference = model if reference_path == model_path else load_causal_lm(reference_path, "float32", trust_remote_code, device).eval()
        reference_logprobs = policy if reference is model else pair_logprobs(reference, tokenizer, pairs, max_length, "policy agreement: M_t")
    rewards = [(p[0] - r[0], p[1] - r[1]) for p, r in zip(policy, reference_logprobs)]
    return {**agreement(rewards, seed), "model": model_path, "reference": reference_path, "pairs_digest": pairs_digest(pairs, max_length),
            "logprobs": {"model": policy, "reference": reference_logprobs}, "seconds": round(time.perf_counter() - started, 1)}
