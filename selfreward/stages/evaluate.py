"""Held-out judge evaluation: how often M_t, as a judge, agrees with human preferences (recipe `evaluation`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from selfreward.data.seeds import seed_instructions
from selfreward.judge.agreement import evaluate_judge
from selfreward.run.jsonl import write_json_atomic
from selfreward.stages.context import StageContext
from selfreward.stages.judging import make_judge


def stage(ctx: StageContext) -> dict[str, Any]:
    """Judge agreement with held-out human rankings and/or pairs; written to iter{t}/judge_eval.json."""
    recipe, config = ctx.recipe, ctx.recipe.evaluation
    started = time.perf_counter()
    judge = make_judge(ctx.backend(), recipe.judge, recipe.seed, mode=config.mode)
    result = evaluate_judge(
        judge, Path(config.ranked) if config.ranked else None, Path(config.pairs) if config.pairs else None,
        config.limit, max_chars=(recipe.limits.max_instruction_chars, recipe.limits.max_response_chars),
        exclude=seed_instructions(recipe.data, recipe.seed, recipe.limits),
    )
    write_json_atomic(ctx.run_dir.judge_eval(ctx.iteration), result)
    return {**result, "seconds": round(time.perf_counter() - started, 1)}  # the stage's time, as every stage reports it


def enabled(recipe) -> bool:
    return bool(recipe.evaluation.ranked or recipe.evaluation.pairs)


def pairwise_accuracy(record: dict) -> float | None:
    """The summary's figure: the judge's pairwise accuracy on the ranked data, else on the pairs."""
    part = record.get("ranked") or record.get("pairs") or {}
    return (part.get("judge") or {}).get("pairwise_accuracy")
