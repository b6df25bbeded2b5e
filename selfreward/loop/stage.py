"""One stage against the run directory, for the loop and for the CLI's per-stage commands alike.

`run_stage` refuses a stage whose inputs are not finished, takes the stage's lock (one writer at a time),
skips a finished stage, resumes a half-finished one, and marks it done only once its outputs are complete.
"""

from __future__ import annotations

import logging
from typing import Any

from selfreward.errors import UserError
from selfreward.loop.shards import run_replicas, stage_file
from selfreward.recipe import Recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl, write_jsonl_atomic
from selfreward.run.units import Shard
from selfreward.stages import MODEL, NEXT_MODEL, SFT, Stage, producer
from selfreward.stages.context import Models, StageContext
from selfreward.train.trainer import machine_rank

log = logging.getLogger(__name__)


def run_stage(
    stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models, shard: Shard | None = None
) -> dict[str, Any] | None:
    """Run one stage of iteration `t` (0 for SFT), or one shard of it; return its done record."""
    if not stage.enabled(recipe):
        return None
    key = stage.done_key(t, shard)
    if (done := run_dir.skip_if_done(key)) is not None:
        return done
    if shard and not stage.shardable:
        raise UserError(f"--shard: stage '{stage.name}' cannot be sharded")
    _require_inputs(stage, recipe, run_dir, t)
    if stage.model == "train" and machine_rank() > 0:
        # Another node of a multi-node training job: it trains its share; node 0 holds the stage, writes
        # the model and marks it done.
        return stage.run(StageContext(recipe, run_dir, t, stage.name, models))
    with run_dir.hold(key):
        if (done := run_dir.skip_if_done(key)) is not None:  # finished by another process while we waited
            return done
        if stage.model in ("train", "forward"):
            models.close()  # generation and training never hold the accelerator together
        ctx = StageContext(recipe, run_dir, t, stage.name, models, shard)
        if stage.shardable and shard is None and recipe.backend.data_parallel_size > 1:
            result = run_replicas(stage, recipe, run_dir, t, models)
            run_dir.mark_done(key, result)
            return result
        result = stage.run(ctx)
        if stage.shardable and not (written := ctx.output(stage_file(run_dir, stage, t))).exists():
            write_jsonl_atomic(written, [])  # no units fell to this shard (or there was no work): an empty part, merged like any other
        if stage.model == "generate" and models.backend is not None:
            result = {**result, "inference_path": models.backend.path}
        if stage.shardable and shard is None:
            output = stage_file(run_dir, stage, t)
            result = {**stage.summarize(ctx, read_jsonl(output)), **result}
        elif shard is not None:
            result = {**result, "shard": shard.index, "of": shard.count,
                      "records": len(read_jsonl(ctx.output(stage_file(run_dir, stage, t))))}
        run_dir.mark_done(key, result)
    return result


def _require_inputs(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int) -> None:
    """Refuse to start a stage whose inputs are not finished, naming the command that makes them."""
    for name in stage.inputs(recipe):
        if name == MODEL:
            if t == 1 and recipe.sft.enabled:
                needed, command = SFT.done_key(0), "sft"
            elif t > 1:
                dpo = producer(NEXT_MODEL)
                needed, command = dpo.done_key(t - 1), f"{dpo.name} --iteration {t - 1}"
            else:
                continue  # M1 is the base model
        else:
            source = producer(name)
            needed, command = source.done_key(t), f"{source.name} --iteration {t}"
        if not run_dir.is_done(needed):
            raise UserError(f"{run_dir.root}: stage '{needed}' has not finished; run `selfreward {command}` first")
