"""`selfreward iterate` (the whole loop), one command per stage (from the stage table), `merge` and `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from selfreward.cli.app import IterationOption, OutputOption, RecipeOption, ShardOption, VerboseOption, _guard, _open, _opener, app, console
from selfreward.errors import UserError


def _print_summary(recipe, run_dir) -> None:
    from selfreward.loop import iteration_metrics
    from selfreward.loop.evidence import write_report
    from selfreward.loop.report import summary_table

    rows = [iteration_metrics(run_dir, t) for t in range(1, recipe.iterations + 1)]
    Console().print(summary_table(rows, run_dir.done_record("sft")))
    html_path, md_path = write_report(recipe, run_dir)
    console.print(f"report: {html_path} and {md_path}", highlight=False)


@app.command()
def iterate(ctx: typer.Context, recipe: RecipeOption, output: OutputOption, verbose: VerboseOption = False) -> None:
    """Run the whole loop: SFT, then every iteration of the recipe. Rerun to resume."""

    def action() -> None:
        from selfreward import loop

        config, run_dir = _open(recipe, output, verbose)
        loop.run(config, run_dir, _opener(ctx))
        _print_summary(config, run_dir)

    _guard(action)


def run_stage_command(ctx: typer.Context, name: str, recipe: Path, output: Path, iteration: int, shard: str | None, verbose: bool) -> None:
    """One stage (or one shard of it) against the run directory, as the loop would run it."""
    from selfreward import loop
    from selfreward.process_tree import join_stage
    from selfreward.run.units import Shard
    from selfreward.stages import BY_NAME
    from selfreward.stages.context import Models

    join_stage()  # a data-parallel replica: dies with the stage that started it
    stage = BY_NAME[name]
    part = Shard.parse(shard) if shard else None
    config, run_dir = _open(recipe, output, verbose)
    if stage.model:
        loop.warn_remote_code(config)
    if not stage.enabled(config):  # nothing to do; a cluster job chain goes on
        console.print(f"stage '{name}' is off in {recipe}: nothing to do", highlight=False)
        return
    with Models(config, _opener(ctx)) as models:
        loop.run_stage(stage, config, run_dir, iteration if stage.per_iteration else 0, models, part)
    if stage.name == "dpo":
        loop.write_metrics(run_dir, iteration)


def _stage_command(stage) -> None:
    """A CLI command for `stage`, from its declaration: --iteration for iteration stages, --shard where it shards."""
    if not stage.per_iteration:
        def command(ctx: typer.Context, recipe: RecipeOption, output: OutputOption, verbose: VerboseOption = False) -> None:
            _guard(lambda: run_stage_command(ctx, stage.name, recipe, output, 0, None, verbose))
    elif stage.shardable:
        def command(ctx: typer.Context, recipe: RecipeOption, output: OutputOption, iteration: IterationOption,
                    shard: ShardOption = None, verbose: VerboseOption = False) -> None:
            _guard(lambda: run_stage_command(ctx, stage.name, recipe, output, iteration, shard, verbose))
    else:
        def command(ctx: typer.Context, recipe: RecipeOption, output: OutputOption, iteration: IterationOption,
                    verbose: VerboseOption = False) -> None:
            _guard(lambda: run_stage_command(ctx, stage.name, recipe, output, iteration, None, verbose))

    command.__doc__ = stage.help + " Rerun to resume."
    app.command(stage.name)(command)


def _register_stage_commands() -> None:
    from selfreward.stages import STAGES

    # `judge` has a file mode too: its command is written out below and runs the stage in stage mode.
    for stage in STAGES:
        if stage.name != "judge":
            _stage_command(stage)


_register_stage_commands()


@app.command()
def merge(
    ctx: typer.Context, recipe: RecipeOption, output: OutputOption, iteration: IterationOption,
    stage: Annotated[str, typer.Option("--stage", help="The sharded stage: generate or judge.")],
    verbose: VerboseOption = False,
) -> None:
    """Join the parts of a sharded stage (selfreward generate|judge --shard i/N) into its file, once every
    part has finished; refuses, naming the missing part, otherwise."""

    def action() -> None:
        from selfreward import loop
        from selfreward.stages import BY_NAME
        from selfreward.stages.context import Models

        if stage not in BY_NAME:
            raise UserError(f"--stage: unknown stage '{stage}' (stages: {', '.join(BY_NAME)})")
        config, run_dir = _open(recipe, output, verbose)
        with Models(config, _opener(ctx)) as models:
            result = loop.merge(BY_NAME[stage], config, run_dir, iteration, models)
        console.print(f"merged {result.get('shards', 'all')} parts of iter{iteration}/{stage}", highlight=False)

    _guard(action)


@app.command()
def report(recipe: RecipeOption, output: OutputOption) -> None:
    """Print the summary table of a run (finished or not) and write its report (RUN/report.html with plots,
    RUN/report.md)."""

    def action() -> None:
        config, run_dir = _open(recipe, output, False, check=False)  # a report reads the run only
        _print_summary(config, run_dir)

    _guard(action)
