"""The self-rewarding loop of Yuan et al. (2024), top to bottom.

    M1 = SFT(M0, IFT + EFT seed data)
    for t = 1 .. T:
        prompts    = self-instruct(M_t, IFT seed instructions)
        candidates = M_t answers each prompt N times
        judgments  = M_t judges each candidate k times; score = mean of parseable scores
        pairs      = best vs worst candidate per prompt; ties dropped
        M_{t+1}    = DPO(M_t, pairs), reference M_t

The stages and their order are declared once, in `selfreward.stages.STAGES`; `run` walks that list.
`run_stage` runs one stage against the run directory, for the loop and for the CLI's per-stage commands
alike: it refuses a stage whose inputs are not finished, takes the stage's lock (one writer at a time),
skips a finished stage, resumes a half-finished one, and marks it done only once its outputs are complete.
A shardable stage can also run as N shards (`shard`), whose parts `merge` joins.
"""

from __future__ import annotations

from typing import Any

from selfreward.backends import open_backend
from selfreward.loop.checks import warn_remote_code
from selfreward.loop.stage import run_stage
from selfreward.recipe import Recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import write_json_atomic
from selfreward.stages import ITERATION, SFT
from selfreward.stages.context import BackendOpener, Models


def run(recipe: Recipe, run_dir: RunDir, opener: BackendOpener = open_backend) -> list[dict[str, Any]]:
    """SFT, then `recipe.iterations` self-rewarding iterations; returns one metrics record per iteration."""
    warn_remote_code(recipe)
    run_dir.bind_recipe(recipe)
    with run_dir.hold("iterate"), Models(recipe, opener) as models:
        run_stage(SFT, recipe, run_dir, 0, models)
        for t in range(1, recipe.iterations + 1):
            for stage in ITERATION:
                run_stage(stage, recipe, run_dir, t, models)
            write_metrics(run_dir, t)
    return [iteration_metrics(run_dir, t) for t in range(1, recipe.iterations + 1)]


def iteration_metrics(run_dir: RunDir, t: int) -> dict[str, Any]:
    """The iteration's figures, read from its stages' done records as each stage declares (None if not run)."""
    records = {stage.name: run_dir.done_record(stage.done_key(t)) or {} for stage in ITERATION}
    metrics: dict[str, Any] = {"iteration": t}
    for stage in ITERATION:
        for metric in stage.metrics:
            metrics[metric.name] = metric.read(records[stage.name]) if records[stage.name] else None
    metrics["seconds"] = {stage.name: records[stage.name].get("seconds") for stage in ITERATION}
    return metrics


def write_metrics(run_dir: RunDir, t: int) -> None:
    write_json_atomic(run_dir.metrics(t), iteration_metrics(run_dir, t))
