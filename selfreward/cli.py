"""The `selfreward` command: the whole loop (`iterate`), one command per stage, and `report`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler

from selfreward.errors import UserError

app = typer.Typer(
    help="Self-rewarding language models (Yuan et al., 2024): SFT, then iterations of self-instruct, "
    "sampling, self-judging and DPO. Every stage reads and writes the run directory, so any command can "
    "be rerun to resume where it stopped.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

RecipeOption = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Run directory; rerun with the same one to resume.")]
IterationOption = Annotated[int, typer.Option("--iteration", "-t", min=1, help="Iteration t (uses M_t, writes iter{t}/).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages too.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)], force=True,
    )
    if not verbose:
        for noisy in ("transformers", "datasets", "accelerate", "trl", "peft", "vllm", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        import datasets
        import transformers

        warnings.filterwarnings("ignore")
        # Our own progress bars show the long steps; the libraries' per-file bars are noise.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _guard(action: Callable[[], None]) -> None:
    """User mistakes: one line and exit code 2. Interrupts: a hint that rerunning resumes."""
    try:
        action()
    except UserError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None


def _open(recipe_path: Path, output: Path, verbose: bool):
    from selfreward.recipe import load_recipe
    from selfreward.rundir import RunDir

    _setup_logging(verbose)
    recipe = load_recipe(recipe_path)
    run_dir = RunDir(output)
    run_dir.bind_recipe(recipe)
    return recipe, run_dir


def _print_summary(recipe, run_dir) -> None:
    from selfreward.pipeline import iteration_metrics
    from selfreward.report import summary_table

    rows = [iteration_metrics(run_dir, t) for t in range(1, recipe.iterations + 1)]
    Console().print(summary_table(rows, run_dir.done_record("sft")))


@app.command()
def iterate(recipe: RecipeOption, output: OutputOption, verbose: VerboseOption = False) -> None:
    """Run the whole loop: SFT, then every iteration of the recipe. Rerun to resume."""

    def action() -> None:
        from selfreward import pipeline

        config, run_dir = _open(recipe, output, verbose)
        pipeline.run(config, run_dir)
        _print_summary(config, run_dir)

    _guard(action)


@app.command()
def sft(recipe: RecipeOption, output: OutputOption, verbose: VerboseOption = False) -> None:
    """SFT: train M1 from the base model on IFT + EFT seed data (writes m1/)."""

    def action() -> None:
        from selfreward import pipeline

        config, run_dir = _open(recipe, output, verbose)
        pipeline.stage_sft(config, run_dir)

    _guard(action)


def _stage_command(name: str, stage: str, doc: str, needs_model: bool) -> None:
    def command(recipe: RecipeOption, output: OutputOption, iteration: IterationOption, verbose: VerboseOption = False) -> None:
        def action() -> None:
            from selfreward import pipeline

            config, run_dir = _open(recipe, output, verbose)
            function = getattr(pipeline, f"stage_{stage}")
            if needs_model:
                with pipeline.Models(config) as models:
                    function(config, run_dir, iteration, models)
            else:
                function(config, run_dir, iteration)
            if stage == "dpo":
                pipeline.write_metrics(run_dir, iteration)

        _guard(action)

    command.__doc__ = doc
    app.command(name)(command)


_stage_command("prompts", "prompts", "Self-instruct: M_t writes new prompts (iter{t}/prompts.jsonl).", True)
_stage_command("generate", "responses", "Sample N candidate responses per prompt (iter{t}/responses.jsonl).", True)
_stage_command("judge", "judgments", "M_t judges each candidate k times (iter{t}/judgments.jsonl).", True)
_stage_command("pairs", "pairs", "Best vs worst candidate per prompt, ties dropped (iter{t}/pairs.jsonl).", False)
_stage_command("dpo", "dpo", "DPO-train M_{t+1} from M_t on the pairs (iter{t}/model/).", False)


@app.command()
def report(recipe: RecipeOption, output: OutputOption) -> None:
    """Print the summary table of a run (finished or not)."""

    def action() -> None:
        config, run_dir = _open(recipe, output, False)
        _print_summary(config, run_dir)

    _guard(action)


def main() -> None:  # pragma: no cover - `python -m selfreward`
    app(sys.argv[1:])
