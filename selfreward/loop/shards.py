"""A shardable stage split into parts: `merge` joins the finished parts of `selfreward <stage> --shard i/N`
into the stage's file, byte for byte what the unsharded stage writes; `run_replicas` runs the parts as
processes on one node (`backend.data_parallel_size`) and joins them."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.process_tree import child_env, tied
from selfreward.recipe import Recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl, write_jsonl_atomic
from selfreward.run.units import Shard
from selfreward.stages import STAGES, Stage
from selfreward.stages.context import Models, StageContext

log = logging.getLogger(__name__)


def merge(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict[str, Any]:
    """Join the finished parts of a sharded stage into its file, in order, and mark the stage done.

    Refuses, naming the first missing or unfinished part, unless every part 1..N is finished.
    """
    if not stage.shardable:
        raise UserError(f"merge: stage '{stage.name}' is not sharded (shardable: {', '.join(s.name for s in STAGES if s.shardable)})")
    key = stage.done_key(t)
    if (done := run_dir.skip_if_done(key)) is not None:
        return done
    output = stage_file(run_dir, stage, t)
    counts = run_dir.part_counts(output, key)
    if not counts:
        raise UserError(f"{run_dir.root}: no parts of stage '{key}' to merge; run `selfreward {stage.name} --shard i/N` first")
    if len(counts) > 1:
        raise UserError(f"{run_dir.root}: parts of stage '{key}' were cut in different ways ({' and '.join(f'N={n}' for n in sorted(counts))}); "
                        "delete the parts of one of them")
    (count,) = counts
    shards = [Shard(i, count) for i in range(1, count + 1)]
    for shard in shards:
        if not run_dir.is_done(stage.done_key(t, shard)):
            state = "unfinished" if run_dir.part(output, shard).exists() else "missing"
            raise UserError(f"{run_dir.root}: part {shard.index}/{count} of stage '{key}' is {state}; "
                            f"run `selfreward {stage.name} --iteration {t} --shard {shard.index}/{count}` first")
    with run_dir.hold(key):
        result = join_parts(stage, recipe, run_dir, t, models, count)
        run_dir.mark_done(key, result)
    return result


def join_parts(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models, count: int) -> dict[str, Any]:
    """Write the stage's file from its `count` finished parts, in order; return the stage's done record."""
    output = stage_file(run_dir, stage, t)
    shards = [Shard(i, count) for i in range(1, count + 1)]
    records = [record for shard in shards for record in read_jsonl(run_dir.part(output, shard))]
    write_jsonl_atomic(output, records)
    parts = [run_dir.done_record(stage.done_key(t, shard)) for shard in shards]
    ctx = StageContext(recipe, run_dir, t, stage.name, models)
    # Which inference path the parts ran on (`run_stage` records it), when they agree.
    paths = {p.get("inference_path") for p in parts} - {None}
    return {**stage.summarize(ctx, records), **({"inference_path": paths.pop()} if len(paths) == 1 else {}),
            "seconds": round(sum(p.get("seconds") or 0 for p in parts), 1), "shards": count}


def run_replicas(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict[str, Any]:
    """Data parallel on one node: `backend.data_parallel_size` processes, each with its own engine (and its
    own `tensor_parallel_size` GPUs), each running one shard of the stage; then their parts are joined.
    A rerun skips the parts already finished."""
    import torch

    count, per_replica = recipe.backend.data_parallel_size, recipe.backend.vllm.tensor_parallel_size
    gpus = torch.cuda.device_count()
    if gpus and gpus < count * per_replica:
        raise UserError(f"{run_dir.recipe_path}: backend.data_parallel_size {count} x backend.vllm.tensor_parallel_size "
                        f"{per_replica} needs {count * per_replica} GPUs; this node has {gpus}")
    models.close()
    processes = []
    for index in range(1, count + 1):
        # Each replica dies with this process and holds the stage's worker lock while it lives.
        env = child_env(run_dir.workers_lock(stage.done_key(t)))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range((index - 1) * per_replica, index * per_replica))
        command = [sys.executable, "-m", "selfreward", stage.name, "--recipe", str(run_dir.recipe_path),
                   "--output", str(run_dir.root), "--iteration", str(t), "--shard", f"{index}/{count}"]
        processes.append(subprocess.Popen(tied(command), env=env))
    failed = [i for i, process in enumerate(processes, start=1) if process.wait() != 0]
    if failed:
        raise UserError(f"{run_dir.root}: replica(s) {', '.join(map(str, failed))} of {count} of stage "
                        f"'{stage.done_key(t)}' failed (their output is above); rerun to resume")
    return join_parts(stage, recipe, run_dir, t, models, count)


def stage_file(run_dir: RunDir, stage: Stage, t: int) -> Path:
    """The one run file a shardable stage writes."""
    (name,) = stage.writes
    return getattr(run_dir, name)(t)
