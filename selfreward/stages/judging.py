"""Judgments: M_t scores each candidate k times with the judge module (the loop's reward)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selfreward.data.limits import count_over, limit_lengths
from selfreward.judge import make_judge
from selfreward.judge import summarize as judged_counts
from selfreward.run.jsonl import read_jsonl
from selfreward.run.units import units_of
from selfreward.stages import pairs
from selfreward.stages.context import StageContext

log = logging.getLogger(__name__)


def judge_candidates(ctx: StageContext, responses_path: Path, output_path: Path, judge_model: str | None = None) -> dict[str, Any]:
    """`judge_model` (default M_t) judges each candidate of `responses_path` k times into `output_path` (this
    process's share of the units).

    The judge reads instructions and responses cut to the recipe's `limits`; the done record counts the cuts.
    """
    t, recipe = ctx.iteration, ctx.recipe
    responses, _ = limit_lengths(read_jsonl(responses_path), recipe.limits.max_instruction_chars,
                                 recipe.limits.max_response_chars, "judged")
    mine = [r for unit in ctx.take(units_of(responses, recipe.judge.unit_size)) for r in unit]
    judge = make_judge(ctx.backend(judge_model), recipe.judge, recipe.seed)
    result = judge.score_file(mine, ctx.output(output_path), f"iter{t} {ctx.stage}", carry=("prompt_id",),
                              unit_size=recipe.judge.unit_size, seed_of=ctx.seed_of)
    return {"judged_now": result["judged_now"], "seconds": result["seconds"]}


def stage(ctx: StageContext) -> dict[str, Any]:
    """judgments = M_t judges each candidate k times."""
    return judge_candidates(ctx, ctx.run_dir.responses(ctx.iteration), ctx.run_dir.judgments(ctx.iteration))


def anchor_stage(ctx: StageContext) -> dict[str, Any]:
    """pairs.anchor: M_t judges the anchor model's candidates like its own (none in iteration 1)."""
    t = ctx.iteration
    if pairs.anchor_model(ctx) is None:
        return {"anchor": None}
    return judge_candidates(ctx, ctx.run_dir.anchor_responses(t), ctx.run_dir.anchor_judgments(t))


def previous_stage(ctx: StageContext) -> dict[str, Any]:
    """dpo.consistency_weighting: M_{t-1} judges M_t's candidates, CREAM's second ranking (none in iteration 1)."""
    t = ctx.iteration
    if (previous := pairs.previous_judge(ctx)) is None:
        log.info("dpo.consistency_weighting: no M_{t-1} judge in iteration 1 (M_0 is the model before SFT); "
                 "its DPO is plain, weighting starts in iteration 2")
        return {"judge": None}
    log.info("dpo.consistency_weighting: %s judges iteration %d's candidates too", previous, t)
    return {"judge": previous, **judge_candidates(ctx, ctx.run_dir.responses(t), ctx.run_dir.previous_judgments(t), previous)}


def summarize(ctx: StageContext, judgments: list[dict], responses_path: Path | None = None) -> dict[str, Any]:
    """The stage's counts, from its whole file (also after `selfreward merge`)."""
    limits = ctx.recipe.limits
    responses = read_jsonl(responses_path or ctx.run_dir.responses(ctx.iteration))
    return {**judged_counts(judgments),
            "truncated": count_over(responses, limits.max_instruction_chars, limits.max_response_chars)}


def anchor_summarize(ctx: StageContext, judgments: list[dict]) -> dict[str, Any]:
    return summarize(ctx, judgments, ctx.run_dir.anchor_responses(ctx.iteration))
