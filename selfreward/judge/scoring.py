"""LLM-as-a-judge with the additive 5-point rubric of Yuan et al. (2024), usable on its own.

    from selfreward.backends import open_backend
    from selfreward.judge import Judge, JudgeItem
    judge = Judge(backend, samples=3)
    results = judge.score([JudgeItem("Name a prime.", "7 is prime.")])
    results[0].score, results[0].scores, results[0].texts, results[0].parse_failures

Parse contract (`parse_score`): the score is the number after the last `Score:` label in the judge's
output. The label is case-insensitive and may carry markdown emphasis (`**Score:** 4`, `**Score: 4**`);
an optional `/5` or `out of 5`, trailing punctuation, whitespace and invisible characters (zero-width
space, BOM) are tolerated. The number must be a whole number from 0 to 5; anything else (6, 3.5, 45,
words, nothing) makes the output unparseable: `None`, counted as a parse failure, never an exception.
Only the judge's output is parsed, never the response being judged.

Scoring modes:
- `sampled` (the paper): k judgments sampled; the score is the mean of the parseable ones, or None.
  Generation of a judgment stops at its first `Score: N` with N in 0-5.
- `expected` (fast): the judge prompt followed by a forced `Score: `; the score is the expectation of
  0-5 under the model's next-token probabilities of those digits (renormalised). No text is generated.

Pairwise comparison of two responses to one instruction, two ways:
- `Judge.compare`: by their rubric scores (first minus second).
- `Judge.pairwise`: a direct prompt showing both responses (`templates/pairwise.txt`), asked in both
  orders so that a preference for a position cancels out. The verdict is the letter after the last
  `Winner:` label (`parse_winner`: A or B, same tolerance as `parse_score`). In sampled mode each order
  gets k samples and `first_wins` is the share of parsed verdicts for the first response; in expected mode
  it is the mean over both orders of the next-token probability of its letter after a forced `Winner: `.

Judged text is data, not instructions (`neutralise`): it cannot close its tag, cannot carry a control
token of the judge's chat template, and verdict claims in it (`Score: 5`, `5/5`, `Winner: A`) are deleted.
Text that argues for a high score in plain words is left alone, and does move small judges.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from selfreward.backends.base import Backend, Sampling
from selfreward.errors import UserError
from selfreward.judge.hygiene import Defence, control_tokens, neutralise
from selfreward.judge.parse import SCORE_STOPS, SCORES, WINNER_STOPS, parse_score, parse_winner
from selfreward.progress import progress_bar
from selfreward.recipe import JudgeSection
from selfreward.run.jsonl import append_jsonl, read_jsonl
from selfreward.run.units import resume_units, unit_seed, units_of
from selfreward.templates import fill, load_template


@dataclass(frozen=True)
class JudgeItem:
    instruction: str
    response: str


@dataclass
class JudgeResult:
    """One item's judgment: `score` aggregates `scores` (one per sample; None where unparseable)."""

    score: float | None
    scores: list[int | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    parse_failures: int = 0


@dataclass(frozen=True)
class JudgePair:
    instruction: str
    first: str
    second: str


@dataclass
class PairwiseResult:
    """A direct comparison asked in both orders: (first, second) shown as (A, B), then as (B, A).

    `first_wins` is the share of votes (sampled) or the probability (expected) that the first response is
    better, over both orders; `by_order` holds the same figure for each order alone, so a judge that
    favours a position shows as two very different numbers. None where nothing could be parsed.
    """

    first_wins: float | None
    by_order: list[float | None] = field(default_factory=list)
    verdicts: list[list[str | None]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    parse_failures: int = 0

    @property
    def winner(self) -> str | None:
        """The preferred response: "first", "second", or None for a tie or no verdict."""
        if self.first_wins is None or self.first_wins == 0.5:
            return None
        return "first" if self.first_wins > 0.5 else "second"

    @property
    def consistent(self) -> bool | None:
        """Whether both orders prefer the same response (None if either order has no verdict)."""
        a, b = self.by_order if len(self.by_order) == 2 else (None, None)
        if a is None or b is None or a == 0.5 or b == 0.5:
            return None
        return (a > 0.5) == (b > 0.5)




def render_judge_prompt(
    template: str, item: JudgeItem, control: re.Pattern[str] | None = None, defence: Defence | None = None
) -> str:
    """The judge instruction for one item (the user turn of the judge conversation)."""
    defence = defence or neutralise
    return fill(template, instruction=defence(item.instruction, control), response=defence(item.response, control))


def render_pairwise_prompt(
    template: str, instruction: str, response_a: str, response_b: str, control: re.Pattern[str] | None = None,
    defence: Defence | None = None,
) -> str:
    """The direct comparison instruction for one order of two responses."""
    defence = defence or neutralise
    return fill(
        template,
        instruction=defence(instruction, control),
        response_a=defence(response_a, control),
        response_b=defence(response_b, control),
    )


MODES = ("sampled", "expected")


def load_judge_template(path: str | Path | None = None) -> str:
    """The rubric template: the file at `path` (it must use {instruction} and {response}), else the packaged one."""
    return load_template(str(path) if path else None, "judge.txt", ("instruction", "response"))


def load_pairwise_template(path: str | Path | None = None) -> str:
    """The direct-comparison template: the file at `path` (with {instruction}, {response_a} and {response_b}),
    else the packaged one."""
    return load_template(str(path) if path else None, "pairwise.txt", ("instruction", "response_a", "response_b"))


def check_mode(mode: str, where: str = "mode") -> str:
    """`mode` if it is a scoring mode; otherwise a `UserError` naming `where` (a recipe key or an option)."""
    if mode not in MODES:
        raise UserError(f"{where}: must be {' or '.join(repr(m) for m in MODES)}, not {mode!r}")
    return mode


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Judge:
    """Scores (instruction, response) items with one backend and one template."""

    def __init__(
        self,
        backend: Backend,
        template: str | None = None,
        mode: str = "sampled",
        samples: int = 3,
        sampling: Sampling | None = None,
        pairwise_template: str | None = None,
        defence: Defence | None = None,
    ) -> None:
        """`defence` replaces `neutralise` as what makes judged text inert (only to measure the defences)."""
        check_mode(mode)
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self.backend = backend
        self.template = template or load_judge_template()
        self.mode = mode
        self.samples = samples
        sampling = sampling or Sampling(temperature=0.7, top_p=0.9, max_new_tokens=192)
        # Sampled judgments end at their verdict, which is kept in the text.
        self.sampling = replace(sampling, stop=sampling.stop + SCORE_STOPS, keep_stop=True)
        self.pairwise_sampling = replace(sampling, stop=sampling.stop + WINNER_STOPS, keep_stop=True)
        self.pairwise_template = pairwise_template or load_pairwise_template()
        self.defence = defence or neutralise
        tokenizer = getattr(backend, "tokenizer", None)
        self.control = control_tokens(tokenizer) if tokenizer is not None else None

    def prompt(self, item: JudgeItem) -> str:
        return self.backend.chat_prompt([{"role": "user", "content": render_judge_prompt(self.template, item, self.control, self.defence)}])

    def score(self, items: Sequence[JudgeItem], seed: int | None = None) -> list[JudgeResult]:
        """Judge every item; all prompts go to the backend in one call. `seed` overrides the sampling seed."""
        if not items:
            return []
        if self.mode == "expected":
            return self._expected(items)
        prompts = [self.prompt(item) for item in items]
        sampling = self.sampling if seed is None else replace(self.sampling, seed=seed)
        results = []
        for completions in self.backend.generate(prompts, self.samples, sampling):
            texts = [c.text for c in completions]
            scores = [parse_score(t) for t in texts]
            parsed = [s for s in scores if s is not None]
            results.append(JudgeResult(mean(parsed), scores, texts, len(scores) - len(parsed)))
        return results

    def _forced_answer(self, prompts: Sequence[str], label: str, answers: Sequence[str]) -> list[list[float]]:
        """Next-token probabilities of each answer after `prompt + label + ' '` (expected mode)."""
        prefix, options = f"{label} ", list(answers)
        token_ids = self.backend.single_token_ids(prompts[0] + prefix, options)
        if token_ids is None:  # tokenizers that merge the space into the answer
            prefix, options = label, [f" {a}" for a in answers]
            token_ids = self.backend.single_token_ids(prompts[0] + prefix, options)
        if token_ids is None:
            raise ValueError(f"expected mode needs each of {', '.join(answers)} to be one token after '{label}'")
        return self.backend.next_token_probs([p + prefix for p in prompts], token_ids)

    def _expected(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        probs = self._forced_answer([self.prompt(item) for item in items], "Score:", [str(s) for s in SCORES])
        results = []
        for row in probs:
            total = sum(row)
            score = sum(s * p for s, p in zip(SCORES, row)) / total if total > 0 else None
            results.append(JudgeResult(score, [], [], 0 if score is not None else 1))
        return results

    @property
    def chunk(self) -> int:
        """Items per backend call: the backend's preferred number of prompts, k of them per item."""
        return max(1, self.backend.chunk_prompts // (self.samples if self.mode == "sampled" else 1))

    def score_all(self, items: Sequence[JudgeItem], label: str = "judging") -> list[JudgeResult]:
        """Judge many items in backend-sized chunks, with a progress bar."""
        return _in_chunks(items, self.chunk, label, self.score)

    def score_file(
        self,
        items: Sequence[dict],
        output: Path,
        label: str = "judging",
        carry: Sequence[str] = (),
        unit_size: int | None = None,
        seed_of: Callable[[str], int] | None = None,
    ) -> dict:
        """Judge `items` ({id, instruction, response, ...}) into the JSONL `output`, resumably.

        Items are judged in consecutive units of `unit_size` (default: the backend's preferred chunk), each
        sampled with `seed_of(first id)` (default: derived from the sampling seed and that id) and appended
        as {id, <carry fields>, score, scores, judgments, parse_failures}. A rerun keeps the complete units
        already in `output`, so an interrupted file ends exactly as an uninterrupted one would.
        Returns counts over the whole file (`summarize`).
        """
        started = time.perf_counter()
        seed_of = seed_of or (lambda first: unit_seed(self.sampling.seed, "judge", 0, first))
        units = units_of(items, unit_size or self.chunk)
        done = resume_units(output, units, "id")
        todo = sum(len(unit) for unit in units[done:])
        with progress_bar(label, len(items), len(items) - todo) as advance:
            for unit in units[done:]:
                results = self.score([JudgeItem(i["instruction"], i["response"]) for i in unit], seed=seed_of(str(unit[0]["id"])))
                append_jsonl(output, (
                    {"id": item["id"], **{key: item[key] for key in carry}, "score": r.score, "scores": r.scores,
                     "judgments": r.texts, "parse_failures": r.parse_failures}
                    for item, r in zip(unit, results)
                ))
                advance(len(unit))
        records = read_jsonl(output) if output.exists() else []
        return {**summarize(records), "judged_now": todo, "seconds": round(time.perf_counter() - started, 1)}

    def compare(self, instruction: str, first: str, second: str) -> float | None:
        """Score difference (first minus second) for two responses to one instruction; None if unscored."""
        a, b = self.score([JudgeItem(instruction, first), JudgeItem(instruction, second)])
        if a.score is None or b.score is None:
            return None
        return a.score - b.score

    def pairwise(self, pairs: Sequence[JudgePair], seed: int | None = None) -> list[PairwiseResult]:
        """Compare each pair directly, in both orders; all 2 x len(pairs) prompts go to the backend at once."""
        if not pairs:
            return []
        prompts = []
        for pair in pairs:
            for a, b in ((pair.first, pair.second), (pair.second, pair.first)):
                content = render_pairwise_prompt(self.pairwise_template, pair.instruction, a, b, self.control, self.defence)
                prompts.append(self.backend.chat_prompt([{"role": "user", "content": content}]))
        if self.mode == "expected":
            return self._pairwise_expected(prompts)
        sampling = self.pairwise_sampling if seed is None else replace(self.pairwise_sampling, seed=seed)
        outputs = self.backend.generate(prompts, self.samples, sampling)
        results = []
        for forward, backward in zip(outputs[0::2], outputs[1::2]):
            texts = [[c.text for c in forward], [c.text for c in backward]]
            verdicts = [[parse_winner(t) for t in order] for order in texts]
            # The first response is "A" in the forward order and "B" in the backward one.
            votes = [[v == letter for v in order if v] for order, letter in zip(verdicts, "AB")]
            by_order = [mean(v) for v in votes]
            failures = sum(v is None for order in verdicts for v in order)
            results.append(PairwiseResult(mean(votes[0] + votes[1]), by_order, verdicts, texts, failures))
        return results

    def _pairwise_expected(self, prompts: Sequence[str]) -> list[PairwiseResult]:
        probs = self._forced_answer(prompts, "Winner:", ["A", "B"])
        results = []
        for forward, backward in zip(probs[0::2], probs[1::2]):
            # P(first better) in each order: its letter's share of the A/B probability mass.
            by_order = [_share(forward[0], forward[1]), _share(backward[1], backward[0])]
            known = [p for p in by_order if p is not None]
            results.append(PairwiseResult(mean(known), by_order, [], [], len(by_order) - len(known)))
        return results

    def pairwise_all(self, pairs: Sequence[JudgePair], label: str = "comparing") -> list[PairwiseResult]:
        """Compare many pairs in backend-sized chunks (two prompts per pair), with a progress bar."""
        return _in_chunks(pairs, max(1, self.chunk // 2), label, self.pairwise)


def summarize(records: Sequence[dict]) -> dict:
    """Counts over judged records: how many, unscored, parse failures, judge samples, mean score."""
    scored = [r["score"] for r in records if r["score"] is not None]
    return {
        "judged": len(records), "unscored": len(records) - len(scored),
        "parse_failures": sum(r["parse_failures"] for r in records),
        "judge_samples": sum(len(r["scores"]) for r in records) or len(records),
        "mean_score": round(sum(scored) / len(scored), 3) if scored else None,
    }


def _in_chunks(items: Sequence, size: int, label: str, judge_chunk) -> list:
    """`judge_chunk` applied to consecutive chunks of `size` items, results concatenated, with progress."""
    results: list = []
    with progress_bar(label, len(items)) as advance:
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            results += judge_chunk(batch)
            advance(len(batch))
    return results


def _share(part: float, other: float) -> float | None:
    total = part + other
    return part / total if total > 0 else None


def make_judge(backend, config: JudgeSection, seed: int = 0, mode: str | None = None) -> Judge:
    """The recipe's judge on `backend` (`mode` overrides the recipe's, for the held-out evaluation)."""
    template = load_judge_template(config.template)
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed)
    return Judge(backend, template, mode or config.mode, config.samples, sampling)
