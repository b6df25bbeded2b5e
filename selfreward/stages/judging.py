"""Judgments: M_t scores each candidate k times with the judge module (the loop's reward)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.jsonl import append_jsonl, resume_records
from selfreward.judge import Judge, JudgeItem
from selfreward.progress import progress_bar
from selfreward.templates import load_template

log = logging.getLogger(__name__)


def run_judging(
    backend: Backend, responses: list[dict], config, output: Path, seed: int = 0, label: str = "judgments"
) -> dict[str, Any]:
    """Write one record per response to `output`: {id, prompt_id, score, scores, judgments, parse_failures}."""
    started = time.perf_counter()
    template = load_template(config.template, "judge.txt", ("instruction", "response"))
    done = {r["id"] for r in resume_records(output)}
    todo = [r for r in responses if r["id"] not in done]
    chunk = max(1, backend.chunk_prompts // config.samples)
    with progress_bar(label, len(responses), len(responses) - len(todo)) as advance:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed + len(done) + start)
            judge = Judge(backend, template, config.mode, config.samples, sampling)
            results = judge.score([JudgeItem(r["instruction"], r["response"]) for r in batch])
            append_jsonl(output, (
                {"id": r["id"], "prompt_id": r["prompt_id"], "score": result.score, "scores": result.scores,
                 "judgments": result.texts, "parse_failures": result.parse_failures}
                for r, result in zip(batch, results)
            ))
            advance(len(batch))
    records = resume_records(output)
    scored = [r["score"] for r in records if r["score"] is not None]
    return {
        "judged": len(records),
        "unscored": len(records) - len(scored),
        "parse_failures": sum(r["parse_failures"] for r in records),
        "judge_samples": sum(len(r["scores"]) for r in records) or len(records),
        "mean_score": round(sum(scored) / len(scored), 3) if scored else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
