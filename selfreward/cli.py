"""The `selfreward` command: the whole loop (`iterate`), one command per stage, and `report`."""

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
from selfreward.limits import MAX_INSTRUCTION_CHARS, MAX_RESPONSE_CHARS

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
    from selfreward.pipeline import check_inputs
    from selfreward.recipe import load_recipe
    from selfreward.rundir import RunDir

    _setup_command(verbose)
    recipe = load_recipe(recipe_path)
    if check:
        check_inputs(recipe, str(recipe_path))
    run_dir = RunDir(output)
    run_dir.bind_recipe(recipe)
    return recipe, run_dir


def _print_summary(recipe, run_dir) -> None:
    from selfreward.pipeline import iteration_metrics
    from selfreward.report import summary_table

    rows = [iteration_metrics(run_dir, t) for t in range(1, recipe.iterations + 1)]
    Console().print(summary_table(rows, run_dir.done_record("sft")))


def _judge_opener(ctx: typer.Context):
    """What opens the judge's model or endpoint in file mode (`app(args, obj={"open_judge_backend": ...})`)."""
    from selfreward import cli_judge

    return (ctx.obj or {}).get("open_judge_backend", cli_judge.open_judge_backend)


def _opener(ctx: typer.Context):
    """The function that loads a model into a backend: the real one, or what the caller passed as
    `app(args, obj={"open_backend": ...})` (tests and benchmarks)."""
    from selfreward.backends import open_backend

    return (ctx.obj or {}).get("open_backend", open_backend)


@app.command()
def iterate(ctx: typer.Context, recipe: RecipeOption, output: OutputOption, verbose: VerboseOption = False) -> None:
    """Run the whole loop: SFT, then every iteration of the recipe. Rerun to resume."""

    def action() -> None:
        from selfreward import pipeline

        config, run_dir = _open(recipe, output, verbose)
        pipeline.run(config, run_dir, _opener(ctx))
        _print_summary(config, run_dir)

    _guard(action)


def run_stage_command(ctx: typer.Context, name: str, recipe: Path, output: Path, iteration: int, shard: str | None, verbose: bool) -> None:
    """One stage (or one shard of it) against the run directory, as the loop would run it."""
    from selfreward import pipeline
    from selfreward.stages import BY_NAME
    from selfreward.stages.context import Models
    from selfreward.units import Shard

    stage = BY_NAME[name]
    part = Shard.parse(shard) if shard else None
    config, run_dir = _open(recipe, output, verbose)
    if stage.model:
        pipeline.warn_remote_code(config)
    if not stage.enabled(config):  # nothing to do; a cluster job chain goes on
        console.print(f"stage '{name}' is off in {recipe}: nothing to do", highlight=False)
        return
    with Models(config, _opener(ctx)) as models:
        pipeline.run_stage(stage, config, run_dir, iteration if stage.per_iteration else 0, models, part)
    if stage.name == "dpo":
        pipeline.write_metrics(run_dir, iteration)


ShardOption = Annotated[str | None, typer.Option("--shard", help="Run part i of N of this stage (i/N, e.g. 2/3); join the parts with `selfreward merge`.")]


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
        from selfreward import pipeline
        from selfreward.stages import BY_NAME
        from selfreward.stages.context import Models

        if stage not in BY_NAME:
            raise UserError(f"--stage: unknown stage '{stage}' (stages: {', '.join(BY_NAME)})")
        config, run_dir = _open(recipe, output, verbose)
        with Models(config, _opener(ctx)) as models:
            result = pipeline.merge(BY_NAME[stage], config, run_dir, iteration, models)
        console.print(f"merged {result.get('shards', 'all')} parts of iter{iteration}/{stage}", highlight=False)

    _guard(action)


@app.command()
def judge(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Stage mode: the run's recipe.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Stage mode: the run directory. File mode: the scored JSONL (resumed by id).")] = None,
    iteration: Annotated[int | None, typer.Option("--iteration", "-t", min=1, help="Stage mode: iteration t.")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="File mode: JSONL of {id, instruction, response}.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="File mode: hub id, directory or embedded:gemma3-270m (the served model's name with --endpoint).")] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Judgments sampled per item (sampled mode).")] = 3,
    mode: Annotated[str, typer.Option("--mode", help="sampled (k chain-of-thought judgments) or expected (probability-weighted score).")] = "sampled",
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")] = None,
    api: Annotated[str, typer.Option("--api", help="Endpoint API: chat or completions (expected mode needs completions).")] = "chat",
    backend: Annotated[str, typer.Option("--backend", help="Local backend: auto, vllm or transformers.")] = "auto",
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option(callback=_top_p_in_range, help="Top-p, in (0, 1].")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 192,
    template: Annotated[Path | None, typer.Option(help="Judge template file with {instruction} and {response}.")] = None,
    max_instruction_chars: Annotated[int, typer.Option(min=1, help="File mode: longer instructions are cut to this many characters (counted).")] = MAX_INSTRUCTION_CHARS,
    max_response_chars: Annotated[int, typer.Option(min=1, help="File mode: longer responses are cut to this many characters (counted).")] = MAX_RESPONSE_CHARS,
    concurrency: Annotated[int, typer.Option(min=1, help="Endpoint: requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(min=1.0, help="Endpoint: seconds per request.")] = 120.0,
    seed: int = 0,
    shard: ShardOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Judge responses. File mode (--input): score any JSONL of items with a model or an endpoint.
    Stage mode (--recipe): M_t judges each candidate of iteration t (iter{t}/judgments.jsonl)."""

    def action() -> None:
        if input is None:
            if recipe is None or output is None or iteration is None:
                raise UserError("judge: give --input, --output and --model (file mode), or --recipe, --output and --iteration (stage mode)")
            run_stage_command(ctx, "judge", recipe, output, iteration, shard, verbose)
            return
        from selfreward import cli_judge
        from selfreward.judge import Judge
        from selfreward.limits import limit_lengths
        from selfreward.templates import load_template

        _setup_command(verbose)
        if output is None or model is None:
            raise UserError("judge: file mode needs --output and --model")
        if mode not in ("sampled", "expected"):
            raise UserError(f"--mode: must be 'sampled' or 'expected', not '{mode}'")
        items = cli_judge.load_items(input)  # all of it, before the model is even looked at
        items, _ = limit_lengths(items, max_instruction_chars, max_response_chars, "judged")  # logs the counts
        text = load_template(str(template) if template else None, "judge.txt", ("instruction", "response"))
        judge_backend = _judge_opener(ctx)(model, endpoint, api, backend, concurrency, timeout)
        try:
            scorer = Judge(judge_backend, text, mode, samples, cli_judge.sampling(temperature, top_p, max_new_tokens, seed))
            result = scorer.score_file(items, output)
        finally:
            judge_backend.close()
        console.print(f"judged {result['judged']} items into {output}: mean score {result['mean_score']}, "
                      f"{result['parse_failures']} parse failures, {result['seconds']} s", highlight=False)

    _guard(action)


@app.command("judge-eval")
def judge_eval(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Judge model (omit for the length baseline only).")] = None,
    ranked: Annotated[Path | None, typer.Option(help="Ranked responses: oasst1 messages or {instruction, responses: [{text, rank}]}.")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Chosen/rejected pairs: hh-rlhf dialogues or {prompt, chosen, rejected} (.jsonl/.gz).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts or pairs.")] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1)] = 3,
    mode: Annotated[str, typer.Option(help="sampled or expected.")] = "sampled",
    method: Annotated[str, typer.Option(help="scores (rate each response 0-5) or pairwise (compare two directly, both orders).")] = "scores",
    max_instruction_chars: Annotated[int, typer.Option(min=1, help="The judge sees instructions cut to this many characters (counted).")] = MAX_INSTRUCTION_CHARS,
    max_response_chars: Annotated[int, typer.Option(min=1, help="The judge sees responses cut to this many characters (counted).")] = MAX_RESPONSE_CHARS,
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible server.")] = None,
    api: Annotated[str, typer.Option(help="Endpoint API: chat or completions.")] = "chat",
    backend: Annotated[str, typer.Option(help="Local backend: auto, vllm or transformers.")] = "auto",
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option(callback=_top_p_in_range, help="Top-p, in (0, 1].")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 192,
    report_path: Annotated[Path | None, typer.Option("--report", help="Also write the metrics here (JSON).")] = None,
    seed: int = 0,
    verbose: VerboseOption = False,
) -> None:
    """Measure a judge against human preferences (pairwise accuracy, 5-best %, exact match %, Spearman,
    Kendall tau), beside a length-only baseline (the longer response wins)."""

    def action() -> None:
        from selfreward import cli_judge
        from selfreward.evaluation import evaluate_judge
        from selfreward.judge import Judge

        _setup_command(verbose)
        if ranked is None and pairs is None:
            raise UserError("judge-eval: give --ranked and/or --pairs")
        if mode not in ("sampled", "expected"):
            raise UserError(f"--mode: must be 'sampled' or 'expected', not '{mode}'")
        if method not in ("scores", "pairwise"):
            raise UserError(f"--method: must be 'scores' or 'pairwise', not '{method}'")
        evaluate_judge(None, ranked, pairs, limit)  # validates the data before any model load
        scorer, judge_backend = None, None
        if model:
            judge_backend = _judge_opener(ctx)(model, endpoint, api, backend, 8, 120.0)
            scorer = Judge(judge_backend, None, mode, samples, cli_judge.sampling(temperature, top_p, max_new_tokens, seed))
        try:
            cli_judge.write_report(report_path, evaluate_judge(
                scorer, ranked, pairs, limit, method, (max_instruction_chars, max_response_chars)))
        finally:
            if judge_backend:
                judge_backend.close()

    _guard(action)


@app.command("eft-build")
def eft_build(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="The IFT-trained model that writes the judgments.")],
    ranked: Annotated[Path, typer.Option(help="Human-ranked responses: oasst1 messages or {instruction, responses: [{text, rank}]}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="EFT JSONL to write (data.eft format).")],
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Judgment sets tried per prompt.")] = 3,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 192,
    verbose: VerboseOption = False,
) -> None:
    """Build EFT seed data as the paper did: sample judgments of human-ranked responses from the
    IFT-trained model; keep a prompt's judgments only where their scores order its responses as humans did."""

    def action() -> None:
        from selfreward import cli_judge
        from selfreward.evaluation import load_ranked
        from selfreward.jsonl import write_jsonl_atomic
        from selfreward.judge import Judge
        from selfreward.seeds import judged_eft

        _setup_command(verbose)
        prompts = load_ranked(ranked)[:limit]
        backend = _judge_opener(ctx)(model, None, "chat", "auto", 8, 120.0)
        try:
            judge = Judge(backend, None, "sampled", samples, cli_judge.sampling(0.7, 0.9, max_new_tokens, 0))
            records, kept = judged_eft(judge, prompts)
        finally:
            backend.close()
        write_jsonl_atomic(output, records)
        console.print(f"kept {kept} of {len(prompts)} prompts ({len(records)} EFT examples) in {output}", highlight=False)

    _guard(action)


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
        from selfreward.slurm import SlurmOptions, submit

        config, run_dir = _open(recipe, output, verbose)
        chosen = iteration or list(range(1, config.iterations + 1))
        options = SlurmOptions(shards, tuple(sbatch_arg or ()), tuple(train_sbatch_arg or ()), prefix)
        for job, job_id in submit(config, recipe, run_dir, chosen, options, dry_run=dry_run):
            typer.echo(f"{job_id}\t{job.name}")  # stdout: the job ids, for scripts

    _guard(action)


@app.command()
def report(recipe: RecipeOption, output: OutputOption) -> None:
    """Print the summary table of a run (finished or not)."""

    def action() -> None:
        config, run_dir = _open(recipe, output, False, check=False)  # a report reads the run only
        _print_summary(config, run_dir)

    _guard(action)

