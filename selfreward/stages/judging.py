"""Judgments: M_t scores each candidate k times with the judge module (the loop's reward)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.judge import Judge
from selfreward.limits import limit_lengths
from selfreward.templates import load_template


def run_judging(
    backend: Backend, responses: list[dict], config, limits, output: Path, seed: int = 0, label: str = "judgments"
) -> dict[str, Any]:
    """Write one record per response to `output`: {id, prompt_id, score, scores, judgments, parse_failures}.

    The judge reads instructions and responses cut to the recipe's `limits`; the result counts the cuts.
    """
    template = load_template(config.template, "judge.txt", ("instruction", "response"))
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed)
    judge = Judge(backend, template, config.mode, config.samples, sampling)
    responses, truncated = limit_lengths(responses, limits.max_instruction_chars, limits.max_response_chars, "judged")
    return {**judge.score_file(responses, output, label, carry=("prompt_id",)), "truncated": truncated}
