"""`selfreward judge` (score any JSONL of items with a model or an endpoint; or the judge stage of a run),
`judge-eval` (a judge against human preferences) and `eft-build` (EFT seed data from human rankings)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from selfreward.backends import Backend, Sampling, open_backend
from selfreward.cli import run
from selfreward.cli.app import ShardOption, VerboseOption, _guard, _setup_command, _top_p_in_range, app, console
from selfreward.errors import UserError
from selfreward.recipe import BackendSection, LimitsSection

LIMITS = LimitsSection()  # the recipe's defaults
from selfreward.run.jsonl import read_jsonl, write_json_atomic

log = logging.getLogger(__name__)


def load_items(path: Path) -> list[dict[str, Any]]:
    """Validate the whole input before anything expensive: {id, instruction, response} per line, unique ids."""
    items = read_jsonl(path, {"instruction": str, "response": str})
    seen: set[str] = set()
    with path.open("rb") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    for number, item in zip(numbers, items):
        if not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
            raise UserError(f"{path}:{number}: field 'id' must be a string or an integer")
        key = str(item["id"])
        if key in seen:
            raise UserError(f"{path}:{number}: duplicate id '{key}'")
        seen.add(key)
    if not items:
        raise UserError(f"{path}: no items to judge")
    return items


def open_judge_backend(
    model: str, endpoint: str | None, api: str, backend: str, concurrency: int, timeout: float
) -> Backend:
    """A local model in a backend (in the recipe's default dtype, `auto`), or an OpenAI-compatible endpoint
    serving `model`."""
    from selfreward.models import load_tokenizer, resolve_model

    if endpoint:
        from selfreward.backends.http import HttpBackend

        tokenizer = None
        if api == "completions":
            tokenizer = load_tokenizer(resolve_model(model))
        # A hosted API's key comes from the environment, never from a file or the command line.
        return HttpBackend(endpoint, model, api=api, concurrency=concurrency, timeout=timeout, tokenizer=tokenizer,
                           api_key=os.environ.get("OPENAI_API_KEY"))
    return open_backend(resolve_model(model), BackendSection(kind=backend))


def _judge_opener(ctx: typer.Context):
    """What opens the judge's model or endpoint in file mode (`app(args, obj={"open_judge_backend": ...})`)."""
    return (ctx.obj or {}).get("open_judge_backend", open_judge_backend)


def sampling(temperature: float, top_p: float, max_new_tokens: int, seed: int) -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)


def write_report(path: Path | None, report: dict, unprinted: tuple[str, ...] = ()) -> None:
    """`report` to `path` (JSON) and the terminal, less its `unprinted` keys there (per-item data)."""
    if path:
        write_json_atomic(path, report)
    Console().print_json(data={key: value for key, value in report.items() if key not in unprinted})


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
    max_instruction_chars: Annotated[int, typer.Option(min=1, help="File mode: longer instructions are cut to this many characters (counted).")] = LIMITS.max_instruction_chars,
    max_response_chars: Annotated[int, typer.Option(min=1, help="File mode: longer responses are cut to this many characters (counted).")] = LIMITS.max_response_chars,
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
            run.run_stage_command(ctx, "judge", recipe, output, iteration, shard, verbose)
            return
        from selfreward.data.limits import limit_lengths
        from selfreward.judge import Judge, check_mode, load_judge_template

        _setup_command(verbose)
        if output is None or model is None:
            raise UserError("judge: file mode needs --output and --model")
        check_mode(mode, "--mode")
        items = load_items(input)  # all of it, before the model is even looked at
        items, _ = limit_lengths(items, max_instruction_chars, max_response_chars, "judged")  # logs the counts
        text = load_judge_template(template)
        judge_backend = _judge_opener(ctx)(model, endpoint, api, backend, concurrency, timeout)
        try:
            scorer = Judge(judge_backend, text, mode, samples, sampling(temperature, top_p, max_new_tokens, seed))
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
    max_instruction_chars: Annotated[int, typer.Option(min=1, help="The judge sees instructions cut to this many characters (counted).")] = LIMITS.max_instruction_chars,
    max_response_chars: Annotated[int, typer.Option(min=1, help="The judge sees responses cut to this many characters (counted).")] = LIMITS.max_response_chars,
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
        from selfreward.judge import Judge, check_mode
        from selfreward.judge.agreement import evaluate_judge

        _setup_command(verbose)
        if ranked is None and pairs is None:
            raise UserError("judge-eval: give --ranked and/or --pairs")
        check_mode(mode, "--mode")
        if method not in ("scores", "pairwise"):
            raise UserError(f"--method: must be 'scores' or 'pairwise', not '{method}'")
        evaluate_judge(None, ranked, pairs, limit)  # validates the data before any model load
        scorer, judge_backend = None, None
        if model:
            judge_backend = _judge_opener(ctx)(model, endpoint, api, backend, 8, 120.0)
            scorer = Judge(judge_backend, None, mode, samples, sampling(temperature, top_p, max_new_tokens, seed))
        try:
            write_report(report_path, evaluate_judge(
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
        from selfreward.data.preferences import load_ranked
        from selfreward.data.seeds import judged_eft
        from selfreward.judge import Judge
        from selfreward.run.jsonl import write_jsonl_atomic

        _setup_command(verbose)
        prompts = load_ranked(ranked)[:limit]
        backend = _judge_opener(ctx)(model, None, "chat", "auto", 8, 120.0)
        try:
            judge = Judge(backend, None, "sampled", samples, sampling(0.7, 0.9, max_new_tokens, 0))
            records, kept = judged_eft(judge, prompts)
        finally:
            backend.close()
        write_jsonl_atomic(output, records)
        console.print(f"kept {kept} of {len(prompts)} prompts ({len(records)} EFT examples) in {output}", highlight=False)

    _guard(action)


def _answers(side: str, ref: str, instructions: list[str], output: Path, backend_kind: str, max_new_tokens: int, opener) -> list[str]:
    """One answer per instruction from `ref`: an answers file (JSON list or JSONL of {instruction, output}),
    or a model that answers greedily; a model's answers are written beside the output in AlpacaEval's
    model_outputs.json format (and reused by a rerun)."""
    from selfreward.judge.compare import generate_answers, load_answers, write_answers
    from selfreward.models import resolve_model

    path = Path(ref)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return load_answers(path, instructions)
    saved = output.with_name(f"{output.name}.{side}_outputs.json")
    if saved.is_file():
        try:
            return load_answers(saved, instructions)
        except UserError:
            pass  # other instructions than last time: answer again
    backend = opener(resolve_model(ref), BackendSection(kind=backend_kind))
    try:
        outputs = generate_answers(backend, instructions, max_new_tokens, f"answers of {side}")
    finally:
        backend.close()
    write_answers(saved, instructions, outputs, ref)
    return outputs


@app.command()
def compare(
    ctx: typer.Context,
    instructions: Annotated[Path, typer.Option(help="Instructions: JSON list or JSONL with 'instruction' (e.g. AlpacaEval's 805).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The side under test: a model (directory, hub id, embedded:...) or an answers file ({instruction, output}, JSON list or JSONL).")],
    baseline: Annotated[str, typer.Option(help="The other side, in the same forms as --model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Summary and per-item verdicts (JSON); the verdicts' JSONL beside it resumes an interrupted run.")],
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge: a model, or with --endpoint the served model's name. Never the model being compared.")],
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible server of the judge (its key from OPENAI_API_KEY).")] = None,
    api: Annotated[str, typer.Option(help="Endpoint API: chat or completions (expected mode needs completions).")] = "chat",
    mode: Annotated[str, typer.Option(help="sampled (a verdict per order) or expected (the verdict letter's probability).")] = "sampled",
    backend: Annotated[str, typer.Option(help="Local backend for models: auto, vllm or transformers.")] = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N instructions.")] = None,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens of a model's (greedy) answer.")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, help="The judge's sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(callback=_top_p_in_range, help="Top-p, in (0, 1].")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens of a judge's verdict.")] = 256,
    concurrency: Annotated[int, typer.Option(min=1, help="Endpoint: requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(min=1.0, help="Endpoint: seconds per request.")] = 120.0,
    seed: int = 0,
    verbose: VerboseOption = False,
) -> None:
    """Head-to-head win rate of --model against --baseline on an instruction set: each item judged in both
    orders (orders that disagree are a tie), with a bootstrap CI, a length-controlled win rate and position
    consistency."""

    def action() -> None:
        from selfreward.judge import Judge, check_mode
        from selfreward.judge.compare import Item, item_id, load_instructions, run_compare

        _setup_command(verbose)
        check_mode(mode, "--mode")
        if judge_model in (model, baseline):
            raise UserError("--judge-model: a model must not judge its own answers; name a fixed judge")
        texts = load_instructions(instructions)[:limit]
        opener = (ctx.obj or {}).get("open_backend", open_backend)
        sides = [_answers(side, ref, texts, output, backend, answer_tokens, opener) for side, ref in (("model", model), ("baseline", baseline))]
        items = [Item(item_id(text, a, b), text, a, b) for text, a, b in zip(texts, *sides)]
        judge_backend = _judge_opener(ctx)(judge_model, endpoint, api, backend, concurrency, timeout)
        try:
            judge = Judge(judge_backend, None, mode, 1, sampling(temperature, top_p, max_new_tokens, seed))
            summary = run_compare(judge, items, output, seed, lambda: {
                "instructions": str(instructions), "model": model, "baseline": baseline, "judge": judge_model, "mode": mode})
        finally:
            judge_backend.close()
        _print_compare(summary, model, baseline, output)

    _guard(action)


def _print_compare(summary: dict, model: str, baseline: str, output: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{model} vs {baseline}")
    table.add_column("")
    table.add_column("value", justify="right")
    ci = summary["win_rate_ci"]
    rows = [("items judged (n)", summary["n"]), ("unparsed, left out", summary["unparsed"]),
            ("wins / ties / losses", f"{summary['wins']} / {summary['ties']} / {summary['losses']}"),
            ("win rate %", f"{summary['win_rate']} [{ci[0]}, {ci[1]}]" if ci else "-"),
            ("length-controlled win rate %", summary["lc_win_rate"]), ("position consistency %", summary["position_consistency"]),
            ("mean chars, model / baseline", f"{summary['model_mean_chars']} / {summary['baseline_mean_chars']}")]
    for label, value in rows:
        table.add_row(label, "-" if value is None else str(value))
    Console().print(table)
    console.print(f"written to {output}", highlight=False)


@app.command("policy-eval")
def policy_eval(
    model: Annotated[str, typer.Option("--model", "-m", help="The DPO-trained policy, M_{t+1} (directory, hub id or embedded:...).")],
    reference: Annotated[str, typer.Option(help="Its reference: M_t (or M1, or the base model, to see the whole run's movement).")],
    ranked: Annotated[Path | None, typer.Option(help="Ranked responses: oasst1 messages or {instruction, responses: [{text, rank}]}.")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Chosen/rejected pairs: hh-rlhf dialogues or {prompt, chosen, rejected} (.jsonl/.gz).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N ranked prompts and N pairs.")] = None,
    max_length: Annotated[int, typer.Option(min=16, help="Tokens of prompt and answer read (the start is kept).")] = 1024,
    report_path: Annotated[Path | None, typer.Option("--report", help="Also write the result here (JSON).")] = None,
    seed: int = 0,
    verbose: VerboseOption = False,
) -> None:
    """Policy agreement with humans, judge-free: the share of human pairs whose chosen answer gets the higher
    implicit DPO reward log pi(y|x) - log pi_ref(y|x) (ties half), with a 95 % bootstrap CI and n."""

    def action() -> None:
        from selfreward.judge.policy import evaluate_policy, human_pairs
        from selfreward.models import resolve_model

        _setup_command(verbose)
        if ranked is None and pairs is None:
            raise UserError("policy-eval: give --ranked and/or --pairs")
        found = human_pairs(ranked, pairs, limit)  # validated before any model loads
        write_report(report_path, evaluate_policy(resolve_model(model), resolve_model(reference), found, max_length, seed), ("logprobs",))

    _guard(action)
