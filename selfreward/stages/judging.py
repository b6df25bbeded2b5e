"""Judgments: M_t scores each candidate k times with the judge module (the loop's reward)."""

from __future__ import annotations

from typing import Any

from selfreward.data.limits import count_over, limit_lengths
from selfreward.judge import make_judge
from selfreward.judge import summarize as judged_counts
from selfreward.run.jsonl import read_jsonl
from selfreward.run.units import units_of
from selfreward.stages.context import StageContext


def stage(ctx: StageContext) -> dict[str, Any]:
    """judgments = M_t judges each candidate k times (this process's share of the units).

    The judge reads instructions and responses cut to the recipe's `limits`; the done record counts the cuts.
    """
    t, recipe = ctx.iteration, ctx.recipe
    responses, _ = limit_lengths(read_jsonl(ctx.run_dir.responses(t)), recipe.limits.max_instruction_chars,
                                 recipe.limits.max_response_chars, "judged")
    mine = [r for unit in ctx.take(units_of(responses, recipe.judge.unit_size)) for r in unit]
    judge = make_judge(ctx.backend(), recipe.judge, recipe.seed)
    result = judge.score_file(mine, ctx.output(ctx.run_dir.judgments(t)), f"iter{t} {ctx.stage}", carry=("prompt_id",),
                              unit_size=recipe.judge.unit_size, seed_of=ctx.seed_of)
    return {"judged_now": result["judged_now"], "seconds": result["seconds"]}


def summarize(ctx: StageContext, judgments: list[dict]) -> dict[str, Any]:
    """The stage's counts, from its whole file (also after `selfreward merge`)."""
    limits = ctx.recipe.limits
    responses = read_jsonl(ctx.run_dir.responses(ctx.iteration))
    return {**judged_counts(judgments),
            "truncated": count_over(responses, limits.max_instruction_chars, limits.max_response_chars)}
