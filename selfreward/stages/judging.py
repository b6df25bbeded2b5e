"""Judgments: M_t scores each candidate k times with the judge module (the loop's reward)."""

from __future__ import annotations

from typing import Any

from selfreward.backends import Sampling
from selfreward.jsonl import read_jsonl
from selfreward.judge import Judge
from selfreward.judge import summarize as judged_counts
from selfreward.limits import count_over, limit_lengths
from selfreward.recipe import JudgeSection
from selfreward.stages.context import StageContext
from selfreward.templates import load_template
from selfreward.units import cut


def make_judge(backend, config: JudgeSection, seed: int = 0, mode: str | None = None) -> Judge:
    """The recipe's judge on `backend` (`mode` overrides the recipe's, for the held-out evaluation)."""
    template = load_template(config.template, "judge.txt", ("instruction", "response"))
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed)
    return Judge(backend, template, mode or config.mode, config.samples, sampling)


def stage(ctx: StageContext) -> dict[str, Any]:
    """judgments = M_t judges each candidate k times (this process's share of the units).

    The judge reads instructions and responses cut to the recipe's `limits`; the done record counts the cuts.
    """
    t, recipe = ctx.iteration, ctx.recipe
    responses, _ = limit_lengths(read_jsonl(ctx.run_dir.responses(t)), recipe.limits.max_instruction_chars,
                                 recipe.limits.max_response_chars, "judged")
    mine = [r for unit in ctx.take(cut(responses, recipe.judge.unit_size)) for r in unit]
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
