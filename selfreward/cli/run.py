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


@app.command()
def ablate(
    ctx: typer.Context,
    recipe: RecipeOption,
    output: OutputOption,
    variants: Annotated[str, typer.Option(
        "--variants", help="Comma-separated: plain (the paper's method, required), length (pairs.length_control: 0), anchor "
        "(pairs.anchor: m1), meta (meta_judge), nll (DPO+NLL), consistency (dpo.consistency_weighting).")] = "plain,length,anchor,meta,nll,consistency",
    verbose: VerboseOption = False,
) -> None:
    """Run the recipe once per variant from the same M1 (OUTPUT/<variant>/), compare each final model with
    plain's by the recipe's fixed head-to-head judge, and write OUTPUT/ablation.md side by side. Rerun to resume."""

    def action() -> None:
        import yaml

        from selfreward.cli.app import _setup_command
        from selfreward.loop import check_inputs
        from selfreward.loop.ablate import ablate as run_ablation
        from selfreward.loop.ablate import parse_variants
        from selfreward.recipe import load_recipe

        _setup_command(verbose)
        names = parse_variants(variants)
        check_inputs(load_recipe(recipe), str(recipe))
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        output.mkdir(parents=True, exist_ok=True)
        run_ablation(raw, str(recipe), output, names, _opener(ctx))
        console.print((output / "ablation.md").read_text(encoding="utf-8"), highlight=False, markup=False)
        console.print(f"ablation report: {output / 'ablation.md'}", highlight=False)

    _guard(action)
