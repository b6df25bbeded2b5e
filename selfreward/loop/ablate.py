"""`selfreward ablate`: the paper's method against its follow-ups, each a recipe switch, side by side.

Every variant is the user's recipe plus one switch (`VARIANTS`), run as its own run directory under the
ablation's output (`<output>/<variant>/`), from the same M1: `plain` runs SFT (when the recipe has it), and
every other variant starts from plain's `m1` with `sft.enabled: false`, the same seed data and seed. Then
each variant's final model meets plain's on the recipe's held-out instructions, judged in both orders by its
fixed judge (`evaluation.head_to_head`, `selfreward compare`'s method), and `<output>/ablation.md` and
`ablation.json` put the variants side by side: judge agreement with humans beside the length-only baseline,
policy agreement, the head-to-head against plain (win rate with its CI, length-controlled), mean response
tokens per iteration, wall time. Every rate carries its n and 95 % interval, and the table says the
smallest difference its n could detect. Rerunning resumes: finished variants are read, not rerun.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.loop.evidence import figures
from selfreward.loop.iterate import run as run_loop
from selfreward.recipe import Recipe, parse_recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_json, write_atomic, write_json_atomic

log = logging.getLogger(__name__)

# Each variant: the recipe keys it sets on top of the user's recipe. Declared once; the CLI's choices, the
# run directories and the report follow from it.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "length": {"pairs": {"length_control": 0.0}},
    "anchor": {"pairs": {"anchor": "m1"}},
    "meta": {"meta_judge": {"enabled": True}},
    "nll": {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}},
    "consistency": {"dpo": {"consistency_weighting": True}},
}
BASELINE = "plain"


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if BASELINE not in names:
        raise UserError(f"--variants: include '{BASELINE}': every variant starts from its M1 and is compared with it")
    if len(set(names)) != len(names):
        raise UserError("--variants: a variant is named twice")
    return [BASELINE] + [name for name in names if name != BASELINE]


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def variant_recipe(raw: dict, name: str, m1: Path | None, source: str) -> Recipe:
    """The user's recipe with the variant's switch; from plain's M1 when `m1` is given. The variant's run
    leaves out the per-iteration head-to-head: the ablation compares the final models with plain's instead."""
    changed = _merge(_merge(raw, VARIANTS[name]), {"evaluation": {"head_to_head": {"instructions": None}}})
    if m1 is not None:
        changed = _merge(changed, {"sft": {"enabled": False}, "model": {"base": str(m1)}})
    try:
        return parse_recipe(changed, f"{source} (variant {name})")
    except UserError as error:
        raise UserError(f"variant {name}: {error}") from None


def ablate(raw: dict, source: str, output: Path, names: list[str], opener, head_to_head=None) -> dict[str, Any]:
    """Run every variant (resuming), compare each final model with plain's, write the side-by-side report.
    `head_to_head(recipe, variant_dir, plain_dir, variant, opener)` is the comparison (default `compare_final`)."""
    head_to_head = head_to_head or compare_final
    recipes = {}
    whole = parse_recipe(raw, source)  # its evaluation.head_to_head compares the final models
    plain = variant_recipe(raw, BASELINE, None, source)
    m1 = RunDir(output / BASELINE).sft_model if plain.sft.enabled else None
    for name in names:  # every recipe is checked before any work starts
        recipes[name] = plain if name == BASELINE else variant_recipe(raw, name, m1, source)
    if plain.iterations < 1:
        raise UserError(f"{source}: iterations: an ablation needs at least one iteration")
    results = {}
    for name in names:
        run_dir = RunDir(output / name)
        timing = output / name / "ablation_seconds.json"
        if not timing.exists():
            log.info("ablation: variant %s in %s", name, run_dir.root)
            started = time.perf_counter()
            run_loop(recipes[name], run_dir, opener)
            write_json_atomic(timing, {"seconds": round(time.perf_counter() - started, 1)})
        results[name] = {"figures": figures(recipes[name], run_dir), "seconds": read_json(timing)["seconds"]}
    for name in names[1:]:
        results[name]["head_to_head"] = head_to_head(whole, RunDir(output / name), RunDir(output / BASELINE), name, opener)
    table = side_by_side(names, results, plain)
    write_json_atomic(output / "ablation.json", table)
    write_atomic(output / "ablation.md", markdown(table))
    return table


def compare_final(recipe: Recipe, variant: RunDir, plain: RunDir, name: str, opener) -> dict[str, Any] | None:
    """The variant's final model against plain's, by the recipe's fixed judge (None where the recipe names no
    head-to-head instructions)."""
    from selfreward.backends.base import Sampling
    from selfreward.data.seeds import seed_instructions, unseen
    from selfreward.judge import Judge
    from selfreward.judge.compare import Item, generate_answers, item_id, load_answers, load_instructions, run_compare, write_answers
    from selfreward.stages.context import Models
    from selfreward.stages.head_to_head import endpoint_judge

    config = recipe.evaluation.head_to_head
    if not config.instructions:
        return None
    instructions, _ = unseen(load_instructions(Path(config.instructions)), seed_instructions(recipe.data, recipe.seed, recipe.limits), text=str)
    instructions = instructions[: config.limit]
    t = recipe.iterations
    output = variant.root.parent / f"head_to_head.{name}-vs-plain.json"
    if output.exists():
        return read_json(output)["summary"]
    answers = {}
    with Models(recipe, opener) as models:
        for side, run_dir in (("variant", variant), ("plain", plain)):
            path = run_dir.root / f"ablation_answers.iter{t}.json"
            if path.exists():
                answers[side] = load_answers(path, instructions)
            else:
                answers[side] = generate_answers(models.get(str(run_dir.model(t))), instructions, config.answer_tokens,
                                                 f"answers of {run_dir.root.name}")
                write_answers(path, instructions, answers[side], str(run_dir.model(t)))
        backend = endpoint_judge(config) if config.endpoint else models.get(config.judge)
        judge = Judge(backend, None, config.mode, 1, Sampling(0.7, 0.9, config.verdict_tokens, seed=recipe.seed))
        items = [Item(item_id(text, a, b), text, a, b) for text, a, b in zip(instructions, answers["variant"], answers["plain"])]
        try:
            return run_compare(judge, items, output, recipe.seed, lambda: {
                "model": str(variant.model(t)), "baseline": str(plain.model(t)), "judge": config.judge, "endpoint": config.endpoint})
        finally:
            if config.endpoint:
                backend.close()


def detectable(n: int | None, pairs: bool = False) -> float | None:
    """The smallest difference (points) a 95 % two-sided test at 80 % power tells from none, near 50 %: for one
    rate against 50 % (a win rate), or (`pairs`) between two independent rates measured on n items each."""
    if not n:
        return None
    spread = math.sqrt(0.25 / n) * (math.sqrt(2) if pairs else 1)
    return round(100 * (1.959964 + 0.841621) * spread, 1)


def side_by_side(names: list[str], results: dict[str, dict], recipe: Recipe) -> dict[str, Any]:
    rows = []
    for name in names:
        iterations = results[name]["figures"]["iterations"]
        last = iterations[-1]
        agreement = next((a for a in (last["judge_agreement"]["ranked"], last["judge_agreement"]["pairs"]) if a), None)
        rows.append({
            "variant": name, "switch": VARIANTS[name],
            "judge": agreement and {k: agreement[k] for k in ("n", "judge", "judge_ci", "length_baseline", "length_baseline_ci")},
            "policy": last["policy_agreement"],
            "head_to_head": results[name].get("head_to_head"),
            "mean_response_tokens": [row["metrics"].get("mean_response_tokens") for row in iterations],
            "pairs": [row["metrics"].get("pairs") for row in iterations],
            "seconds": results[name]["seconds"],
        })
    judge_n = next((r["judge"]["n"] for r in rows if r["judge"]), None)
    policy_n = next((r["policy"]["n"] for r in rows if r["policy"]), None)
    duel_n = next((r["head_to_head"]["n"] for r in rows if r["head_to_head"]), None)
    return {"iterations": recipe.iterations, "variants": rows, "detectable_difference": {
        "judge_agreement_between_variants": detectable(judge_n, pairs=True),
        "policy_agreement_between_variants": detectable(policy_n, pairs=True),
        "win_rate_against_50": detectable(duel_n)}}


def _rate(value, ci, n) -> str:
    if value is None:
        return "-"
    return f"{value} [{ci[0]}, {ci[1]}] n={n}" if ci else f"{value} n={n}"


def markdown(table: dict[str, Any]) -> str:
    lines = [f"# Ablation: each switch against the paper's method ({table['iterations']} iteration(s), the final model)", "",
             "| variant | judge agreement % [95 % CI] | longer answer wins % | policy agreement % [95 % CI] | "
             "vs plain: win rate % [95 % CI] | vs plain: LC win rate % | mean response tokens per iteration | pairs per iteration | wall time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table["variants"]:
        judge, policy, duel = row["judge"] or {}, row["policy"] or {}, row["head_to_head"] or {}
        lines.append("| " + " | ".join([
            f"{row['variant']} `{json.dumps(row['switch'])}`" if row["switch"] else row["variant"],
            _rate(judge.get("judge"), judge.get("judge_ci"), judge.get("n")),
            str(judge.get("length_baseline", "-")),
            _rate(policy.get("accuracy"), policy.get("accuracy_ci"), policy.get("n")),
            "(baseline)" if row["variant"] == BASELINE else _rate(duel.get("win_rate"), duel.get("win_rate_ci"), duel.get("n")),
            "-" if row["variant"] == BASELINE else str(duel.get("lc_win_rate", "-")),
            " → ".join(str(v) for v in row["mean_response_tokens"]),
            " → ".join(str(v) for v in row["pairs"]),
            str(row["seconds"]),
        ]) + " |")
    d = table["detectable_difference"]
    lines += ["", "Smallest difference these n can detect (95 %, two-sided, 80 % power, near 50 %): "
              f"judge agreement between two variants {d['judge_agreement_between_variants'] or '-'} points, policy agreement "
              f"{d['policy_agreement_between_variants'] or '-'} points, a win rate against 50 % {d['win_rate_against_50'] or '-'} points. "
              "A difference smaller than that, or an interval that holds 50 % (a win rate) or the other variant's value, "
              "is not evidence that a switch helped or hurt.", ""]
    return "\n".join(lines)
