"""Policy agreement: M_{t+1}'s implicit DPO reward against M_t as a judge of held-out human pairs (recipe
`evaluation.policy`), judge-free: did this iteration move the policy toward what humans prefer?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfreward.data.seeds import seed_instructions
from selfreward.judge.policy import evaluate_policy, human_pairs, pairs_digest
from selfreward.models import resolve_model
from selfreward.run.jsonl import read_json, write_json_atomic
from selfreward.stages.context import StageContext


def stage(ctx: StageContext) -> dict[str, Any]:
    """Written to iter{t}/policy_eval.json (with both models' log-probabilities of every pair); the done record
    holds its figures."""
    config, t = ctx.recipe.evaluation, ctx.iteration
    pairs = human_pairs(Path(config.ranked) if config.ranked else None, Path(config.pairs) if config.pairs else None, config.limit,
                        seed_instructions(ctx.recipe.data, ctx.recipe.seed, ctx.recipe.limits))
    # M_t was the policy of the iteration before: its log-probabilities of the same pairs are on disk.
    before = read_json(ctx.run_dir.policy_eval(t - 1)) if t > 1 and ctx.run_dir.policy_eval(t - 1).exists() else None
    reuse = before["logprobs"]["model"] if before and before.get("pairs_digest") == pairs_digest(pairs, config.policy_max_length) else None
    result = evaluate_policy(str(ctx.run_dir.model(t)), resolve_model(ctx.current_model), pairs, config.policy_max_length,
                             ctx.recipe.seed, ctx.recipe.model.trust_remote_code, reuse)
    write_json_atomic(ctx.run_dir.policy_eval(t), result)
    return {key: value for key, value in result.items() if key != "logprobs"}


def enabled(recipe) -> bool:
    return recipe.evaluation.policy and bool(recipe.evaluation.ranked or recipe.evaluation.pairs)


def interval(record: dict) -> str | None:
    """The accuracy's 95 % CI and n, as the summary table shows them."""
    low_high = record.get("accuracy_ci")
    return f"[{low_high[0]}, {low_high[1]}], n={record['n']}" if low_high else None
