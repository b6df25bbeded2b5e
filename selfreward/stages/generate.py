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
from selfreward.stages.context import StageContext

log = logging.getLogger(__name__)


def run_generate(
    backend: Backend,
    prompts: list[dict],
    config: ResponsesSection,
    output: Path,
    seed_of: Callable[[str], int],
    label: str = "responses",
) -> dict[str, Any]:
    """Write `config.n` candidates per prompt to `output`, one unit of `config.unit_size` prompts at a time.

    `prompts` are this process's units' prompts (all of them, or one shard's); `seed_of(first prompt id)`
    seeds a unit. A rerun keeps the complete units already in `output` and redoes the rest.
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
                {"id": f"{p['id']}-r{i}", "prompt_id": p["id"], "index": i, "instruction": p["instruction"],
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


def summarize(ctx: StageContext, responses: list[dict]) -> dict[str, Any]:
    """The stage's counts, from its whole file (also after `selfreward merge`)."""
    return {
        "prompts": len({r["prompt_id"] for r in responses}),
        "responses": len(responses),
        "mean_tokens": round(mean(r["tokens"] for r in responses), 1) if responses else 0,
        "unfinished": sum(not r["finished"] for r in responses),
    }
