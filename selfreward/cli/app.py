"""The `selfreward` typer app and what every command shares: options, logging set-up, one-line errors, and
the model openers that tests and benchmarks replace through `app(args, obj={...})`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from selfreward import allocator
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


def _top_p_in_range(value: float) -> float:
    """--top-p: top-p keeps the smallest set of tokens holding this much probability, so 0 would keep none."""
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


RecipeOption = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Run directory; rerun with the same one to resume.")]
IterationOption = Annotated[int, typer.Option("--iteration", "-t", min=1, help="Iteration t (uses M_t, writes iter{t}/).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages too.")]
ShardOption = Annotated[str | None, typer.Option("--shard", help="Run part i of N of this stage (i/N, e.g. 2/3); join the parts with `selfreward merge`.")]


def _setup_command(verbose: bool) -> None:
    """What every command sets up first: the allocator setting (`allocator.keep_freed_memory`), logging."""
    allocator.keep_freed_memory()
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
        # Messages quote paths and file contents: brackets in them are text, not rich markup.
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None


def _open(recipe_path: Path, output: Path, verbose: bool, check: bool = True):
    from selfreward.loop import check_inputs
    from selfreward.recipe import load_recipe
    from selfreward.run.directory import RunDir

    _setup_command(verbose)
    recipe = load_recipe(recipe_path)
    if check:
        check_inputs(recipe, str(recipe_path))
    run_dir = RunDir(output)
    run_dir.bind_recipe(recipe)
    return recipe, run_dir


def _opener(ctx: typer.Context):
    """The function that loads a model into a backend: the real one, or what the caller passed as
    `app(args, obj={"open_backend": ...})` (tests and benchmarks)."""
    from selfreward.backends import open_backend

    return (ctx.obj or {}).get("open_backend", open_backend)
