"""Head to head: M_{t+1}'s answers against M_t's on held-out instructions, each judged in both orders by one
fixed judge named in the recipe, never by the models being compared (recipe `evaluation.head_to_head`; the
method and the figures of `selfreward compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfreward.backends.base import Sampling
from selfreward.data.seeds import seed_instructions, unseen
from selfreward.errors import UserError
from selfreward.judge import Judge
from selfreward.judge.compare import Item, generate_answers, item_id, load_answers, load_instructions, run_compare, write_answers
from selfreward.models import resolve_model
from selfreward.stages.context import StageContext


def _answers(ctx: StageContext, model: str, path: Path, instructions: list[str]) -> list[str]:
    """`model`'s greedy answers, kept in `path` (AlpacaEval's format) so that a rerun or the next iteration reads them."""
    if path.exists():
        return load_answers(path, instructions)
    outputs = generate_answers(ctx.backend(model), instructions, ctx.recipe.evaluation.head_to_head.answer_tokens,
                               f"iter{ctx.iteration} answers of {Path(model).name}")
    write_answers(path, instructions, outputs, model)
    return outputs


def stage(ctx: StageContext) -> dict[str, Any]:
    recipe, t, run_dir = ctx.recipe, ctx.iteration, ctx.run_dir
    config = recipe.evaluation.head_to_head
    instructions, dropped = unseen(load_instructions(Path(config.instructions)), seed_instructions(recipe.data, recipe.seed, recipe.limits), text=str)
    instructions = instructions[: config.limit]
    output = run_dir.head_to_head(t)
    model = _answers(ctx, str(run_dir.model(t)), output.with_name(output.name + ".model_outputs.json"), instructions)
    # M_t's answers are M_{t+1}'s of the iteration before, when there was one.
    before = run_dir.head_to_head(t - 1)
    earlier = before.with_name(before.name + ".model_outputs.json")
    baseline_path = earlier if t > 1 and earlier.exists() else output.with_name(output.name + ".baseline_outputs.json")
    baseline = _answers(ctx, ctx.current_model, baseline_path, instructions)
    if config.endpoint:
        backend = endpoint_judge(config)
    else:
        compared = {str(Path(m).resolve()) for m in (str(run_dir.model(t)), resolve_model(ctx.current_model))}
        if str(Path(resolve_model(config.judge)).resolve()) in compared:
            raise UserError(f"evaluation.head_to_head.judge: '{config.judge}' is one of the models it would compare; name a fixed judge")
        backend = ctx.backend(config.judge)
    judge = Judge(backend, None, config.mode, 1, Sampling(0.7, 0.9, config.verdict_tokens, seed=recipe.seed))
    items = [Item(item_id(text, a, b), text, a, b) for text, a, b in zip(instructions, model, baseline)]
    summary = run_compare(judge, items, output, recipe.seed, lambda: {
        "model": str(run_dir.model(t)), "baseline": ctx.current_model, "judge": config.judge, "instructions": config.instructions})
    if config.endpoint:
        backend.close()
    return {**summary, "dropped_seen_in_seeds": dropped}


def endpoint_judge(config):
    """The fixed judge served at `config.endpoint` (its key from OPENAI_API_KEY, never from a file)."""
    import os

    from selfreward.backends.http import HttpBackend

    return HttpBackend(config.endpoint, config.judge, api=config.api, api_key=os.environ.get("OPENAI_API_KEY"))


def enabled(recipe) -> bool:
    return bool(recipe.evaluation.head_to_head.instructions)


def interval(record: dict) -> str | None:
    ci = record.get("win_rate_ci")
    return f"[{ci[0]}, {ci[1]}], n={record['n']}" if ci else None
