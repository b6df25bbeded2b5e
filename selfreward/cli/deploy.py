"""`selfreward slurm`: the recipe's iterations as a chain of SLURM jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from selfreward.cli.app import OutputOption, RecipeOption, VerboseOption, _guard, _open, app


@app.command()
def slurm(
    recipe: RecipeOption,
    output: OutputOption,
    iteration: Annotated[list[int] | None, typer.Option("--iteration", "-t", min=1, help="Iteration(s) to submit (repeat the option); default: all of the recipe's.")] = None,
    shards: Annotated[int, typer.Option(min=1, help="Split generate and judge into this many array tasks (then merge).")] = 1,
    sbatch_arg: Annotated[list[str] | None, typer.Option("--sbatch", help="An #SBATCH option for every job, e.g. --sbatch=--partition=gpu (repeat).")] = None,
    train_sbatch_arg: Annotated[list[str] | None, typer.Option("--train-sbatch", help="An #SBATCH option for SFT and DPO jobs only, e.g. --train-sbatch=--gpus-per-node=8.")] = None,
    prefix: Annotated[str, typer.Option(help="What runs selfreward inside a job, e.g. 'apptainer exec --nv selfreward.sif' (default: the installed package).")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the job scripts and print the sbatch commands; submit nothing.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Submit iterations to SLURM as a chain of dependent, requeueable jobs: one per stage, generate and
    judge as job arrays of shards followed by a merge, SFT and DPO on launcher.num_machines nodes.
    The job scripts and their logs go to <output>/slurm/."""

    def action() -> None:
        from selfreward.deploy.slurm import SlurmOptions, submit

        config, run_dir = _open(recipe, output, verbose)
        chosen = iteration or list(range(1, config.iterations + 1))
        options = SlurmOptions(shards, tuple(sbatch_arg or ()), tuple(train_sbatch_arg or ()), prefix)
        for job, job_id in submit(config, recipe, run_dir, chosen, options, dry_run=dry_run):
            typer.echo(f"{job_id}\t{job.name}")  # stdout: the job ids, for scripts

    _guard(action)
