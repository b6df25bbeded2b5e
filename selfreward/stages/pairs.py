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
from typing import Any

from selfreward.run.jsonl import read_jsonl, write_jsonl_atomic
from selfreward.stages.context import StageContext


def score_range(candidates: list[dict]) -> tuple[list[dict], float, float] | None:
    """(the scored candidates, best score, worst score), or None when fewer than two are scored or all tie."""
    scored = [c for c in candidates if c["score"] is not None]
    if len(scored) < 2:
        return None
    high = max(c["score"] for c in scored)
    low = min(c["score"] for c in scored)
    return None if high == low else (scored, high, low)


def choose_pair(candidates: list[dict], rng: random.Random) -> tuple[dict, dict] | None:
    """(best, worst) among candidates with a score, or None when fewer than two or best and worst tie."""
    if (found := score_range(candidates)) is None:
        return None
    scored, high, low = found
    best = rng.choice([c for c in scored if c["score"] == high])
    worst = rng.choice([c for c in scored if c["score"] == low])
    return best, worst


def choose_by_length(candidates: list[dict], rng: random.Random, rho: float) -> tuple[dict, dict] | None:
    """(shortest of the top band, longest of the bottom band) by `tokens`; equal lengths broken by `rng`.
    None when fewer than two are scored or the best and worst scores tie."""
    if (found := score_range(candidates)) is None:
        return None
    scored, high, low = found
    top = [c for c in scored if c["score"] >= (1 - rho) * high + rho * low]
    bottom = [c for c in scored if c["score"] <= (1 - rho) * low + rho * high]
    shortest = min(c["tokens"] for c in top)
    chosen = rng.choice([c for c in top if c["tokens"] == shortest])
    bottom = [c for c in bottom if c["score"] < chosen["score"]]  # at rho = 0.5 the bands meet
    longest = max(c["tokens"] for c in bottom)
    return chosen, rng.choice([c for c in bottom if c["tokens"] == longest])


def run_pairs(responses: list[dict], judgments: list[dict], output: Path, seed: int = 0, rho: float | None = None) -> dict[str, Any]:
    """Write TRL preference records {id, prompt, chosen, rejected, ...} to `output`, atomically; `rho`: length
    control (None: best vs worst)."""
    started = time.perf_counter()
    score_of = {j["id"]: j["score"] for j in judgments}
    by_prompt: dict[str, list[dict]] = {}
    for r in responses:
        by_prompt.setdefault(r["prompt_id"], []).append({**r, "score": score_of.get(r["id"])})
    pairs, ties, unscored = [], 0, 0
    for prompt_id, candidates in by_prompt.items():
        rng = random.Random(f"{seed}:{prompt_id}")
        chosen = choose_pair(candidates, rng) if rho is None else choose_by_length(candidates, rng, rho)
        if chosen is None:
            if sum(c["score"] is not None for c in candidates) < 2:
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
        })
    write_jsonl_atomic(output, pairs)
    return {
        "prompts": len(by_prompt), "pairs": len(pairs), "ties_dropped": ties, "unscored_dropped": unscored,
        **({"length_control": rho} if rho is not None else {}),
        "seconds": round(time.perf_counter() - started, 3),
    }


def stage(ctx: StageContext) -> dict[str, Any]:
    """pairs = best vs worst candidate per prompt; ties dropped."""
    t = ctx.iteration
    return run_pairs(read_jsonl(ctx.run_dir.responses(t)), read_jsonl(ctx.run_dir.judgments(t)), ctx.run_dir.pairs(t),
                     ctx.recipe.seed, ctx.recipe.pairs.rho(t))
