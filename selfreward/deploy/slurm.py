"""Iterations as chains of SLURM jobs, derived from the stage declarations.

One job per stage, in loop order, each starting only after the previous one succeeded (`afterok`): a
failed stage stops the chain, and SLURM cancels what depended on it. A shardable stage becomes a job
array of `shards` tasks (each `selfreward <stage> --shard i/N`) followed by a `merge` job. Training stages
run on `launcher.num_machines` nodes, one `selfreward` per node through `srun`; each starts `accelerate
launch` for its node's processes. Every job is `--requeue`: a preempted job runs again and its stage
resumes where it stopped. The job scripts are written to `<run>/slurm/` (readable, rerunnable by hand).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from selfreward.errors import UserError, writing
from selfreward.recipe import Recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import write_atomic, write_json_atomic
from selfreward.stages import ITERATION, SFT, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    shards: int = 1
    # Extra #SBATCH lines for every job (partition, account, time, gres...) and for training jobs only.
    sbatch: tuple[str, ...] = ()
    train_sbatch: tuple[str, ...] = ()
    # What runs `selfreward` in a job: empty for the installed package, or a container runner such as
    # "apptainer exec --nv selfreward.sif" (the image's entrypoint is not used: the command is explicit).
    prefix: str = ""


@dataclass
class Job:
    name: str  # iter1-generate, iter1-generate-merge, ...
    command: list[str]  # the selfreward arguments
    array: int = 0  # tasks, for a shard array
    nodes: int = 1
    train: bool = False
    after: list[str] = field(default_factory=list)


def plan(recipe: Recipe, iterations: list[int], shards: int) -> list[Job]:
    """The jobs of `iterations`, in order (SFT first when iteration 1 is among them)."""
    jobs: list[Job] = []
    if 1 in iterations and SFT.enabled(recipe):
        jobs.append(Job("sft", ["sft"], nodes=recipe.launcher.num_machines, train=True))
    for t in iterations:
        for stage in ITERATION:
            if not stage.enabled(recipe):
                continue
            jobs += _stage_jobs(stage, recipe, t, shards)
    jobs.append(Job("report", ["report"]))  # the run's report.html and report.md, from what the jobs wrote
    return jobs


def _stage_jobs(stage: Stage, recipe: Recipe, t: int, shards: int) -> list[Job]:
    base = [stage.name, "--iteration", str(t)]
    if stage.shardable and shards > 1:
        return [Job(f"iter{t}-{stage.name}", base, array=shards),
                Job(f"iter{t}-{stage.name}-merge", ["merge", "--iteration", str(t), "--stage", stage.name])]
    train = stage.model == "train"
    return [Job(f"iter{t}-{stage.name}", base, nodes=recipe.launcher.num_machines if train else 1, train=train)]


def script(job: Job, recipe_path: Path, run_dir: RunDir, options: SlurmOptions, workdir: Path) -> str:
    """The sbatch script of one job."""
    logs = run_dir.root.resolve() / "slurm" / "logs"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=selfreward-{job.name}",
        f"#SBATCH --output={logs}/{job.name}-%A{'_%a' if job.array else ''}.out",
        "#SBATCH --open-mode=append",  # a requeued job adds to its log
        "#SBATCH --requeue",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if job.array:
        lines.append(f"#SBATCH --array=1-{job.array}")
    lines += [f"#SBATCH {arg}" for arg in options.sbatch + (options.train_sbatch if job.train else ())]
    # The installed package runs as this interpreter's module (the same environment on a shared file
    # system); a container prefix runs the image's own `selfreward`.
    program = [*shlex.split(options.prefix), "selfreward"] if options.prefix else [sys.executable, "-m", "selfreward"]
    command = [*program, *job.command,
               "--recipe", str(recipe_path.resolve()), "--output", str(run_dir.root.resolve())]
    run = shlex.join(command)
    if job.array:
        run += f' --shard "$SLURM_ARRAY_TASK_ID/{job.array}"'
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir.resolve()))}",
        'echo "[$(date -u +%FT%TZ)] $SLURM_JOB_ID on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"',
    ]
    if job.nodes > 1:
        # One selfreward per node; node 0 holds the stage and writes the model and the done record.
        lines += [
            'export SELFREWARD_MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            f"srun --ntasks-per-node=1 bash -c 'SELFREWARD_MACHINE_RANK=$SLURM_NODEID exec {run}'",
        ]
    else:
        lines.append(f"exec {run}")
    return "\n".join(lines) + "\n"


def submit(recipe: Recipe, recipe_path: Path, run_dir: RunDir, iterations: list[int], options: SlurmOptions,
           sbatch: str = "sbatch", dry_run: bool = False) -> list[tuple[Job, str]]:
    """Write the job scripts and submit them as one `afterok` chain; return (job, SLURM job id) pairs."""
    jobs = plan(recipe, iterations, options.shards)
    folder = run_dir.root / "slurm"
    with writing(folder / "logs"):
        (folder / "logs").mkdir(parents=True, exist_ok=True)
    submitted: list[tuple[Job, str]] = []
    previous: str | None = None
    for number, job in enumerate(jobs, start=1):
        path = folder / f"{number:02d}-{job.name}.sbatch"
        write_atomic(path, script(job, recipe_path, run_dir, options, Path.cwd()))
        command = [sbatch, "--parsable", "--kill-on-invalid-dep=yes"]
        if previous:
            command.append(f"--dependency=afterok:{previous}")
        command.append(str(path))
        if dry_run:
            job_id = f"<{job.name}>"
            log.info("%s", shlex.join(command))
        else:
            job_id = _sbatch(command)
        submitted.append((job, job_id))
        previous = job_id
    if not dry_run:
        write_json_atomic(folder / "jobs.json", [{"name": job.name, "job_id": job_id} for job, job_id in submitted])
    return submitted


def _sbatch(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError(f"'{command[0]}' not found: run this on a SLURM login node (or use --dry-run)") from None
    if done.returncode != 0:
        raise UserError(f"sbatch refused {command[-1]}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]
