"""How well a judge agrees with humans: the reward-modelling metrics of Yuan et al. (2024).

Two kinds of human data:
- ranked: several responses per instruction with a human rank (0 = best), e.g. oasst1 first turns;
  metrics: pairwise accuracy, 5-best %, exact match %, Spearman and Kendall correlation.
- pairs: chosen vs rejected (e.g. hh-rlhf); metric: pairwise accuracy.

Definitions. Pairwise accuracy: over all pairs of responses to one instruction with different human
ranks, the share the judge orders the same way (a tie or a missing score counts as a miss). 5-best %: the
share of instructions whose human-best response gets the top score, 5 (a mean score of k samples counts
when it is 5; where humans tie for best, any of the tied responses counts). Exact match %: the share of
instructions whose full ranking by the judge equals the human one: every pair the humans order, the judge
orders the same way, and it ties exactly the pairs the humans tie (a missing score is a miss). Both are
independent of the order the responses are listed in. Spearman and Kendall (tau-b): rank correlation of
judge scores with human ranks per instruction, averaged over instructions where both are defined.

With `method="pairwise"` the judge compares the two responses of every human-ordered pair directly
(`Judge.pairwise`, both orders); only pairwise accuracy is defined then, reported with the share of
pairs on which both orders agree (position consistency).

A length baseline (longer response = better) is reported beside every judge: on real oasst1 first turns
it is hard to beat, so a judge that does not beat it has learned little beyond length.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

from selfreward.data.limits import truncate_text
from selfreward.data.preferences import PreferencePair, RankedPrompt, load_pairs, load_ranked
from selfreward.data.seeds import unseen
from selfreward.judge.scoring import Judge, JudgeItem, JudgePair, PairwiseResult
from selfreward.recipe import LimitsSection

log = logging.getLogger(__name__)


def _agrees(a: float | None, b: float | None) -> bool:
    """Judge prefers the first (human-better) response."""
    return a is not None and b is not None and a > b


def ranked_metrics(
    scores: Sequence[Sequence[float | None]], ranks: Sequence[Sequence[int]], on_rubric: bool = True
) -> dict[str, float | int | None]:
    """All five metrics over prompts; `scores[i][j]` is the judge's score of response j of prompt i.

    `on_rubric=False` (scores not on the 0-5 scale, like the length baseline) leaves 5-best % undefined.
    """
    from scipy.stats import kendalltau, spearmanr

    agree = total = best5 = exact = 0
    spearman, kendall = [], []
    for row, human in zip(scores, ranks):
        for better, worse in _human_ordered(human):
            total += 1
            agree += _agrees(row[better], row[worse])
        top = min(human)
        best5 += any(row[k] is not None and row[k] >= 5 for k in range(len(row)) if human[k] == top)
        exact += _same_ranking(row, human)
        if all(s is not None for s in row) and len(set(row)) > 1 and len(set(human)) > 1:
            negated = [-h for h in human]  # rank 0 is best: correlate scores with -rank
            rho, tau = spearmanr(row, negated).statistic, kendalltau(row, negated).statistic
            if not math.isnan(rho):
                spearman.append(rho)
            if not math.isnan(tau):
                kendall.append(tau)
    prompts = len(scores)
    return {
        "prompts": prompts,
        "pairs": total,
        "pairwise_accuracy": _pct(agree, total),
        "five_best": _pct(best5, prompts) if on_rubric else None,
        "exact_match": _pct(exact, prompts),
        "spearman": round(sum(spearman) / len(spearman), 4) if spearman else None,
        "kendall_tau": round(sum(kendall) / len(kendall), 4) if kendall else None,
    }


def _same_ranking(scores: Sequence[float | None], ranks: Sequence[int]) -> bool:
    """The judge orders (or ties) every pair exactly as the humans do; higher score, lower rank = better."""
    # Pair by pair rather than comparing sorted index lists: sorting broke human ties by list position,
    # which made the metric depend on the order the responses happen to be listed in.
    if any(s is None for s in scores):
        return False
    return all((scores[i] > scores[j]) == (ranks[i] < ranks[j]) and (scores[i] == scores[j]) == (ranks[i] == ranks[j])
               for i, j in combinations(range(len(scores)), 2))


def pair_metrics(chosen: Sequence[float | None], rejected: Sequence[float | None]) -> dict[str, float | int | None]:
    agree = sum(_agrees(c, r) for c, r in zip(chosen, rejected))
    return {"pairs": len(chosen), "pairwise_accuracy": _pct(agree, len(chosen))}


def direct_metrics(results: Sequence[PairwiseResult]) -> dict[str, float | int | None]:
    """Pairwise accuracy of direct comparisons whose first response is the human-preferred one."""
    consistent = [r.consistent for r in results if r.consistent is not None]
    return {
        "pairs": len(results),
        "pairwise_accuracy": _pct(sum(r.winner == "first" for r in results), len(results)),
        "position_consistency": _pct(sum(consistent), len(consistent)),
        "parse_failures": sum(r.parse_failures for r in results),
    }


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def length_scores(texts: Sequence[str]) -> list[float]:
    """The length baseline: a longer response scores higher."""
    return [float(len(t)) for t in texts]


def evaluate_judge(
    judge: Judge | None,
    ranked: Path | None,
    pairs: Path | None,
    limit: int | None,
    method: str = "scores",
    max_chars: tuple[int, int] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Judge (and the length baseline) against human preferences; judge None = baseline only.

    `method`: "scores" rates every response on the rubric; "pairwise" compares pairs directly.
    The judge sees instructions and responses cut to `max_chars` (instruction, response; default the
    recipe's `limits`), counted in the report as `truncated`; the length baseline sees the full texts.
    Items whose instruction is in `exclude` (`selfreward.data.seeds.normal` form: the seed instructions) are
    left out before the `limit`, counted as `dropped_seen_in_seeds`.
    """
    if max_chars is None:
        limits = LimitsSection()
        max_chars = (limits.max_instruction_chars, limits.max_response_chars)
    report: dict[str, Any] = {}
    if ranked:
        prompts, dropped = unseen(load_ranked(ranked), exclude)
        prompts = prompts[:limit]
        report["ranked"] = {"file": str(ranked), "dropped_seen_in_seeds": dropped, "length_baseline": ranked_metrics(
            [length_scores(p.responses) for p in prompts], [p.ranks for p in prompts], on_rubric=False)}
        if judge:
            cut_prompts, report["ranked"]["truncated"] = _cut_ranked(prompts, *max_chars)
            report["ranked"]["judge"] = _timed(lambda: _judge_ranked(judge, cut_prompts, method))
    if pairs:
        items, dropped = unseen(load_pairs(pairs), exclude)
        items = items[:limit]
        report["pairs"] = {"file": str(pairs), "dropped_seen_in_seeds": dropped, "length_baseline": pair_metrics(
            [len(p.chosen) for p in items], [len(p.rejected) for p in items])}
        if judge:
            cut_items, report["pairs"]["truncated"] = _cut_pairs(items, *max_chars)
            report["pairs"]["judge"] = _timed(lambda: _judge_pairs(judge, cut_items, method))
    return report


def _cut_ranked(prompts: Sequence[RankedPrompt], max_instruction: int, max_response: int) -> tuple[list[RankedPrompt], int]:
    texts = [(p.instruction, *p.responses) for p in prompts]
    cut_texts, count = _cut_all(texts, max_instruction, max_response)
    return [replace(p, instruction=t[0], responses=tuple(t[1:])) for p, t in zip(prompts, cut_texts)], count


def _cut_pairs(items: Sequence[PreferencePair], max_instruction: int, max_response: int) -> tuple[list[PreferencePair], int]:
    cut_texts, count = _cut_all([(p.instruction, p.chosen, p.rejected) for p in items], max_instruction, max_response)
    return [replace(p, instruction=i, chosen=c, rejected=r) for p, (i, c, r) in zip(items, cut_texts)], count


def _cut_all(rows: Sequence[tuple[str, ...]], max_instruction: int, max_response: int) -> tuple[list[tuple[str, ...]], int]:
    """Each row is (instruction, response, ...): cut to the limits; returns the rows and how many texts were cut."""
    out, count = [], 0
    for row in rows:
        cut_row = (truncate_text(row[0], max_instruction), *(truncate_text(text, max_response) for text in row[1:]))
        count += sum(a != b for a, b in zip(row, cut_row))
        out.append(cut_row)
    if count:
        log.warning("judge-eval: cut %d texts to %d / %d characters (instruction / response)", count, max_instruction, max_response)
    return out, count


def _timed(measure) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = measure()
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def _judge_ranked(judge: Judge, prompts: Sequence[RankedPrompt], method: str) -> dict[str, Any]:
    if method == "pairwise":
        return direct_metrics(judge.pairwise_all([
            JudgePair(p.instruction, p.responses[i], p.responses[j])
            for p in prompts for i, j in _human_ordered(p.ranks)
        ]))
    flat = [JudgeItem(p.instruction, r) for p in prompts for r in p.responses]
    results = judge.score_all(flat)
    scores, position = [], 0
    for p in prompts:
        scores.append([r.score for r in results[position : position + len(p.responses)]])
        position += len(p.responses)
    metrics = ranked_metrics(scores, [p.ranks for p in prompts])
    metrics["parse_failures"] = sum(r.parse_failures for r in results)
    return metrics


def _human_ordered(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of responses with different human ranks."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i, j in combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]


def _judge_pairs(judge: Judge, items: Sequence[PreferencePair], method: str) -> dict[str, Any]:
    if method == "pairwise":
        return direct_metrics(judge.pairwise_all([JudgePair(p.instruction, p.chosen, p.rejected) for p in items]))
    results = judge.score_all([JudgeItem(p.instruction, text) for p in items for text in (p.chosen, p.rejected)])
    metrics = pair_metrics([r.score for r in results[0::2]], [r.score for r in results[1::2]])
    metrics["parse_failures"] = sum(r.parse_failures for r in results)
    return metrics
