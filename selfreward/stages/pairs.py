"""Preference pairs: per prompt, the highest- vs the lowest-scoring candidate; ties dropped.

When several candidates share the best (or worst) score, one is picked with a random generator seeded
from the recipe seed and the prompt id, so the same run always builds the same pairs. With length control
(recipe `pairs.length_control`, rho) the pair is the shortest answer of the top score band against the
longest of the bottom band (`choose_by_length`), and the records carry both lengths.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from statistics import mean
from typing import Any

from selfreward.run.jsonl import read_jsonl, write_jsonl_atomic
from selfreward.stages.context import StageContext


def score_range(chosen_pool: list[dict], rejected_pool: list[dict]) -> tuple[list[dict], list[dict], float, float] | None:
    """(the scored candidates of each pool, the best score of the chosen pool, the worst of the rejected pool),
    or None when either has no score or the best does not beat the worst. Without an anchor both pools are
    the prompt's candidates (a tie: every scored one alike, or fewer than two scored)."""
    chosen = [c for c in chosen_pool if c["score"] is not None]
    rejected = [c for c in rejected_pool if c["score"] is not None]
    if not chosen or not rejected:
        return None
    high = max(c["score"] for c in chosen)
    low = min(c["score"] for c in rejected)
    return None if high <= low else (chosen, rejected, high, low)


def choose_pair(chosen_pool: list[dict], rejected_pool: list[dict], rng: random.Random) -> tuple[dict, dict] | None:
    """(best of the chosen pool, worst of the rejected pool), or None (see `score_range`)."""
    if (found := score_range(chosen_pool, rejected_pool)) is None:
        return None
    chosen, rejected, high, low = found
    best = rng.choice([c for c in chosen if c["score"] == high])
    worst = rng.choice([c for c in rejected if c["score"] == low])
    return best, worst


def choose_by_length(chosen_pool: list[dict], rejected_pool: list[dict], rng: random.Random, rho: float) -> tuple[dict, dict] | None:
    """(shortest of the top band, longest of the bottom band) by `tokens`; equal lengths broken by `rng`.
    None when `score_range` finds no pair."""
    if (found := score_range(chosen_pool, rejected_pool)) is None:
        return None
    chosen, rejected, high, low = found
    top = [c for c in chosen if c["score"] >= (1 - rho) * high + rho * low]
    bottom = [c for c in rejected if c["score"] <= (1 - rho) * low + rho * high]
    shortest = min(c["tokens"] for c in top)
    best = rng.choice([c for c in top if c["tokens"] == shortest])
    bottom = [c for c in bottom if c["score"] < best["score"]]  # at rho = 0.5 the bands meet
    longest = max(c["tokens"] for c in bottom)
    return best, rng.choice([c for c in bottom if c["tokens"] == longest])


def consistency(candidates: list[dict], previous: dict[str, float | None]) -> float:
    """CREAM's C for one prompt: (Kendall tau-b between M_t's and M_{t-1}'s scores of its candidates + 1) / 2,
    over the candidates both scored. Where tau-b is undefined (fewer than two such candidates, or one model
    scores them all alike) the two rankings carry no agreement either way: C = 0.5."""
    both = [(c["score"], previous[c["id"]]) for c in candidates if c["score"] is not None and previous.get(c["id"]) is not None]
    tau = kendall_tau_b([a for a, _ in both], [b for _, b in both])
    return 0.5 if tau is None else (tau + 1) / 2


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two paired score lists (ties in either corrected for), None where undefined."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return None if denominator == 0 else (concordant - discordant) / denominator


def run_pairs(
    responses: list[dict],
    judgments: list[dict],
    output: Path,
    seed: int = 0,
    rho: float | None = None,
    anchor: tuple[list[dict], list[dict]] | None = None,
    previous: list[dict] | None = None,
) -> dict[str, Any]:
    """Write TRL preference records {id, prompt, chosen, rejected, ...} to `output`, atomically.

    `rho`: length control (None: best vs worst). `anchor`: (responses, judgments) of the anchor model, whose
    candidates are the rejected pool (None: M_t's own). `previous`: M_{t-1}'s judgments of `responses`, for
    each pair's CREAM consistency (None: not recorded)."""
    started = time.perf_counter()
    by_prompt = _scored(responses, judgments)
    anchored = _scored(*anchor) if anchor else {}
    previous_score = {j["id"]: j["score"] for j in previous or []}
    pairs, ties, unscored = [], 0, 0
    for prompt_id, candidates in by_prompt.items():
        rng = random.Random(f"{seed}:{prompt_id}")
        rejected_pool = anchored.get(prompt_id, []) if anchor else candidates
        chosen = (choose_pair(candidates, rejected_pool, rng) if rho is None
                  else choose_by_length(candidates, rejected_pool, rng, rho))
        if chosen is None:
            scored = sum(c["score"] is not None for c in candidates)
            if anchor:
                no_pair_to_score = not scored or all(c["score"] is None for c in rejected_pool)
            else:
                no_pair_to_score = scored < 2
            if no_pair_to_score:
                unscored += 1
            else:
                ties += 1
            continue
        best, worst = chosen
        pairs.append({
            "id": prompt_id,
            "prompt": [{"role": "user", "content": best["instruction"]}],
            "chosen": [{"role": "assistant", "content": best["response"]}],
            "rejected": [{"role": "assistant", "content": worst["response"]}],
            "chosen_id": best["id"], "rejected_id": worst["id"],
            "chosen_score": best["score"], "rejected_score": worst["score"],
            **({"chosen_tokens": best["tokens"], "rejected_tokens": worst["tokens"]} if rho is not None else {}),
            **({"consistency": round(consistency(candidates, previous_score), 6)} if previous is not None else {}),
        })
    write_jsonl_atomic(output, pairs)
    return {
        "prompts": len(by_prompt), "pairs": len(pairs), "ties_dropped": ties, "unscored_dropped": unscored,
        **({"length_control": rho} if rho is not None else {}),
        **({"anchored": len(anchored)} if anchor else {}),
        **({"mean_consistency": round(mean(p["consistency"] for p in pairs), 4) if pairs else None} if previous is not None else {}),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _scored(responses: list[dict], judgments: list[dict]) -> dict[str, list[dict]]:
    """Each prompt's candidates, each with its judged `score` (None where unjudged or unparsed)."""
    score_of = {j["id"]: j["score"] for j in judgments}
    by_prompt: dict[str, list[dict]] = {}
    for r in responses:
        by_prompt.setdefault(r["prompt_id"], []).append({**r, "score": score_of.get(r["id"])})
    return by_prompt


def stage(ctx: StageContext) -> dict[str, Any]:
    """pairs = best vs worst candidate per prompt; ties dropped (with the recipe's switches: length bands, an
    anchor model's candidates as the rejected pool, CREAM's consistency per pair)."""
    t, run_dir, recipe = ctx.iteration, ctx.run_dir, ctx.recipe
    anchor = None
    if anchor_model(ctx) is not None:
        anchor = (read_jsonl(run_dir.anchor_responses(t)), read_jsonl(run_dir.anchor_judgments(t)))
    previous = read_jsonl(run_dir.previous_judgments(t)) if previous_judge(ctx) is not None else None
    return run_pairs(read_jsonl(run_dir.responses(t)), read_jsonl(run_dir.judgments(t)), run_dir.pairs(t),
                     recipe.seed, recipe.pairs.rho(t), anchor, previous)


def anchor_model(ctx: StageContext) -> str | None:
    """The anchor model of iteration t (recipe `pairs.anchor`), or None where there is none or it is M_t."""
    t, which = ctx.iteration, ctx.recipe.pairs.anchor
    if which is None or t < 2:
        return None
    return ctx.run_dir.model_for(1 if which == "m1" else t - 1, ctx.recipe)


def previous_judge(ctx: StageContext) -> str | None:
    """M_{t-1}, the second judge of CREAM's consistency (recipe `dpo.consistency_weighting`), or None where
    the switch is off or t = 1 (M_0, the model before SFT, is no judge)."""
    if not ctx.recipe.dpo.consistency_weighting or ctx.iteration < 2:
        return None
    return ctx.run_dir.model_for(ctx.iteration - 1, ctx.recipe)
