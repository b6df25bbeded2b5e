"""Responses: N candidate answers per prompt from M_t, one unit of prompts per backend call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.progress import progress_bar
from selfreward.recipe import ResponsesSection
from selfreward.run.jsonl import append_jsonl, read_jsonl
from selfreward.run.units import resume_units, units_of
from selfreward.stages import pairs
from selfreward.stages.context import StageContext

log = logging.getLogger(__name__)


def run_generate(
    backend: Backend,
    prompts: list[dict],
    config: ResponsesSection,
    output: Path,
    seed_of: Callable[[str], int],
    label: str = "responses",
    tag: str = "r",
) -> dict[str, Any]:
    """Write `config.n` candidates per prompt to `output`, one unit of `config.unit_size` prompts at a time.

    `prompts` are this process's units' prompts (all of them, or one shard's); `seed_of(first prompt id)`
    seeds a unit. Candidate ids are `{prompt id}-{tag}{index}`. A rerun keeps the complete units already in `output` and redoes the rest.
    """
    started = time.perf_counter()
    units = units_of(prompts, config.unit_size)
    done = resume_units(output, units, "prompt_id", config.n)
    with progress_bar(label, len(prompts), sum(len(u) for u in units[:done])) as advance:
        for unit in units[done:]:
            sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed_of(unit[0]["id"]))
            outputs = backend.generate(
                [backend.chat_prompt([{"role": "user", "content": p["instruction"]}]) for p in unit], config.n, sampling
            )
            append_jsonl(output, (
                {"id": f"{p['id']}-{tag}{i}", "prompt_id": p["id"], "index": i, "instruction": p["instruction"],
                 "response": c.text, "tokens": c.tokens, "finished": c.finished}
                for p, completions in zip(unit, outputs) for i, c in enumerate(completions)
            ))
            advance(len(unit))
    return {"seconds": round(time.perf_counter() - started, 1)}


def stage(ctx: StageContext) -> dict[str, Any]:
    """candidates = M_t answers each prompt N times (this process's share of the units)."""
    t, config = ctx.iteration, ctx.recipe.responses
    prompts = read_jsonl(ctx.run_dir.prompts(t))
    mine = [p for unit in ctx.take(units_of(prompts, config.unit_size)) for p in unit]
    output = ctx.output(ctx.run_dir.responses(t))
    return run_generate(ctx.backend(), mine, config, output, ctx.seed_of, f"iter{t} {ctx.stage}")


def anchor_stage(ctx: StageContext) -> dict[str, Any]:
    """pairs.anchor: the anchor model answers the same prompts N times, ids `{prompt id}-a{index}`. Nothing
    (an empty file) while the anchor is M_t, in iteration 1."""
    t, config = ctx.iteration, ctx.recipe.responses
    output = ctx.output(ctx.run_dir.anchor_responses(t))
    if (anchor := pairs.anchor_model(ctx)) is None:
        log.info("pairs.anchor: %s is M_t (or before SFT) in iteration %d; anchored negatives start in iteration 2",
                 ctx.recipe.pairs.anchor, t)
        return {"anchor": None}
    prompts = read_jsonl(ctx.run_dir.prompts(t))
    mine = [p for unit in ctx.take(units_of(prompts, config.unit_size)) for p in unit]
    log.info("pairs.anchor: rejected answers of iteration %d come from %s", t, anchor)
    result = run_generate(ctx.backend(anchor), mine, config, output, ctx.seed_of, f"iter{t} {ctx.stage}", tag="a")
    return {"anchor": anchor, **result}


def summarize(ctx: StageContext, responses: list[dict]) -> dict[str, Any]:
    """The stage's counts, from its whole file (also after `selfreward merge`)."""
    return {
        "prompts": len({r["prompt_id"] for r in responses}),
        "responses": len(responses),
        "mean_tokens": round(mean(r["tokens"] for r in responses), 1) if responses else 0,
        "unfinished": sum(not r["finished"] for r in responses),
    }
