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

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from selfreward.backends import open_backend
from selfreward.errors import UserError
from selfreward.jsonl import read_jsonl, write_json_atomic, write_jsonl_atomic
from selfreward.models import check_model_reference
from selfreward.recipe import Recipe
from selfreward.rundir import RunDir
from selfreward.seeds import load_eft, load_ift
from selfreward.stages import ITERATION, MODEL, SFT, STAGES, Stage, producer
from selfreward.stages.context import BackendOpener, Models, StageContext
from selfreward.training import machine_rank
from selfreward.units import Shard

log = logging.getLogger(__name__)


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


def run_stage(
    stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models, shard: Shard | None = None
) -> dict[str, Any] | None:
    """Run one stage of iteration `t` (0 for SFT), or one shard of it; return its done record."""
    if not stage.enabled(recipe):
        return None
    key = stage.done_key(t, shard)
    if (done := _skip(run_dir, key)) is not None:
        return done
    if shard and not stage.shardable:
        raise UserError(f"--shard: stage '{stage.name}' cannot be sharded")
    _require_inputs(stage, recipe, run_dir, t)
    if stage.model == "train" and machine_rank() > 0:
        # Another node of a multi-node training job: it trains its share; node 0 holds the stage, writes
        # the model and marks it done.
        return stage.run(StageContext(recipe, run_dir, t, stage.name, models))
    with run_dir.hold(key):
        if (done := _skip(run_dir, key)) is not None:  # finished by another process while we waited
            return done
        if stage.model == "train":
            models.close()  # generation and training never hold the accelerator together
        ctx = StageContext(recipe, run_dir, t, stage.name, models, shard)
        if stage.shardable and shard is None and recipe.backend.data_parallel_size > 1:
            result = _run_replicas(stage, recipe, run_dir, t, models)
            run_dir.mark_done(key, result)
            return result
        result = stage.run(ctx)
        if stage.shardable and shard is None:
            output = _file(run_dir, stage, t)
            result = {**stage.summarize(ctx, read_jsonl(output)), **result}
        elif shard is not None:
            result = {**result, "shard": shard.index, "of": shard.count,
                      "records": len(read_jsonl(ctx.output(_file(run_dir, stage, t))))}
        run_dir.mark_done(key, result)
    return result


def merge(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict[str, Any]:
    """Join the finished parts of a sharded stage into its file, in order, and mark the stage done.

    Refuses, naming the first missing or unfinished part, unless every part 1..N is finished.
    """
    if not stage.shardable:
        raise UserError(f"merge: stage '{stage.name}' is not sharded (shardable: {', '.join(s.name for s in STAGES if s.shardable)})")
    key = stage.done_key(t)
    if (done := _skip(run_dir, key)) is not None:
        return done
    output = _file(run_dir, stage, t)
    counts = _part_counts(run_dir, stage, t, output)
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
        result = _join(stage, recipe, run_dir, t, models, count)
        run_dir.mark_done(key, result)
    return result


def _join(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models, count: int) -> dict[str, Any]:
    """Write the stage's file from its `count` finished parts, in order; return the stage's done record."""
    output = _file(run_dir, stage, t)
    shards = [Shard(i, count) for i in range(1, count + 1)]
    records = [record for shard in shards for record in read_jsonl(run_dir.part(output, shard))]
    write_jsonl_atomic(output, records)
    parts = [run_dir.done_record(stage.done_key(t, shard)) for shard in shards]
    ctx = StageContext(recipe, run_dir, t, stage.name, models)
    return {**stage.summarize(ctx, records), "seconds": round(sum(p.get("seconds") or 0 for p in parts), 1),
            "shards": count}


def _run_replicas(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict[str, Any]:
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
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range((index - 1) * per_replica, index * per_replica))
        command = [sys.executable, "-m", "selfreward", stage.name, "--recipe", str(run_dir.recipe_path),
                   "--output", str(run_dir.root), "--iteration", str(t), "--shard", f"{index}/{count}"]
        processes.append(subprocess.Popen(command, env=env))
    failed = [i for i, process in enumerate(processes, start=1) if process.wait() != 0]
    if failed:
        raise UserError(f"{run_dir.root}: replica(s) {', '.join(map(str, failed))} of {count} of stage "
                        f"'{stage.done_key(t)}' failed (their output is above); rerun to resume")
    return _join(stage, recipe, run_dir, t, models, count)


def _part_counts(run_dir: RunDir, stage: Stage, t: int, output: Path) -> set[int]:
    """The N of every part found (part files and part done records), so that a lone part still names N."""
    pattern = re.compile(r"\.part-(\d+)-of-(\d+)$")
    names = [p.stem for p in output.parent.glob(f"{output.stem}.part-*-of-*{output.suffix}")]
    names += run_dir.done_keys(f"{stage.done_key(t)}.part-")
    return {int(match.group(2)) for name in names if (match := pattern.search(name))}


def _file(run_dir: RunDir, stage: Stage, t: int) -> Path:
    """The one run file a shardable stage writes."""
    (name,) = stage.writes
    return getattr(run_dir, name)(t)


def _skip(run_dir: RunDir, key: str) -> dict | None:
    record = run_dir.done_record(key)
    if record is not None:
        log.info("%s: already done, skipping", key)
    return record


def _require_inputs(stage: Stage, recipe: Recipe, run_dir: RunDir, t: int) -> None:
    """Refuse to start a stage whose inputs are not finished, naming the command that makes them."""
    for name in stage.inputs(recipe):
        if name == MODEL:
            if t == 1 and recipe.sft.enabled:
                needed, command = SFT.done_key(0), "sft"
            elif t > 1:
                dpo = producer(MODEL)
                needed, command = dpo.done_key(t - 1), f"{dpo.name} --iteration {t - 1}"
            else:
                continue  # M1 is the base model
        else:
            source = producer(name)
            needed, command = source.done_key(t), f"{source.name} --iteration {t}"
        if not run_dir.is_done(needed):
            raise UserError(f"{run_dir.root}: stage '{needed}' has not finished; run `selfreward {command}` first")


def check_inputs(recipe: Recipe, source: str) -> None:
    """Every file and model the recipe names exists: checked before any work starts and before the run
    directory is created, so that a typo costs a second rather than an SFT run."""
    files = {
        "data.ift": recipe.data.ift, "data.eft": recipe.data.eft, "prompts.template": recipe.prompts.template,
        "judge.template": recipe.judge.template, "evaluation.ranked": recipe.evaluation.ranked,
        "evaluation.pairs": recipe.evaluation.pairs, "launcher.config_file": recipe.launcher.config_file,
    }
    oasst1 = recipe.data.oasst1
    if oasst1 and (Path(oasst1).suffix in {".jsonl", ".json", ".parquet", ".gz"} or oasst1.startswith((".", "/", "~"))):
        files["data.oasst1"] = oasst1  # a local file, not a hub id
    for key, value in files.items():
        if value is not None and not Path(value).expanduser().exists():
            raise UserError(f"{source}: {key}: '{value}' not found (relative paths start from {Path.cwd()})")
    for key, ref in (("model.base", recipe.model.base), ("prompts.model", recipe.prompts.model)):
        try:
            if ref:
                check_model_reference(ref)
        except UserError as error:
            raise UserError(f"{source}: {key}: {error}") from None
    # Seed files are small: read them whole now, so a bad line is reported before the run starts.
    if recipe.data.ift and not load_ift(recipe.data.ift) and not recipe.data.oasst1:
        raise UserError(f"{recipe.data.ift}: empty file: no IFT seed examples")
    if recipe.data.eft:
        load_eft(recipe.data.eft)


def warn_remote_code(recipe: Recipe) -> None:
    """Put it in the run log when the recipe lets model repositories run their own Python code here."""
    if recipe.model.trust_remote_code:
        models = [recipe.model.base] + ([recipe.prompts.model] if recipe.prompts.model else [])
        log.warning("model.trust_remote_code is on: code from %s will be executed", " and ".join(models))


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
