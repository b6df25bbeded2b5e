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
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from selfreward.backends.base import Backend, Sampling
from selfreward.jsonl import append_jsonl, resume_records
from selfreward.progress import progress_bar
from selfreward.templates import fill, load_template

SCORES = range(6)
# Sampled judgments stop at the first `Score: N` (N in 0-5): whatever follows only costs time, and small
# models tend to ramble on and bury a valid score under a broken one (the last label counts).
SCORE_STOPS = tuple(f"Score: {s}" for s in SCORES)
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
LABEL = re.compile(r"(?<![a-z])score[*_]*\s*:", re.IGNORECASE)
VALUE = re.compile(
    r"[\s*_]*(?P<number>\d+(?:[.,]\d+)?)[\s*_]*(?:/\s*5|out\s+of\s+5)?[\s*_]*[.!;,)\]]*[\s*_]*(?:\n|\Z)",
    re.IGNORECASE,
)
# Tags that delimit the judged material; a response that contains them cannot close its own block early.
DELIMITER = re.compile(r"<\s*(/?)\s*(instruction|response)\s*>", re.IGNORECASE)


def parse_score(text: str) -> int | None:
    """The judge's score: the whole number 0-5 after the last `Score:` label, else None."""
    text = text.translate(INVISIBLE)
    labels = list(LABEL.finditer(text))
    if not labels:
        return None
    match = VALUE.match(text, labels[-1].end())
    if match is None:
        return None
    number = match.group("number")
    if not number.isdigit():
        return None
    value = int(number)
    return value if value in SCORES else None


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


def neutralise_delimiters(text: str) -> str:
    """Rewrite tag look-alikes inside judged text, so it cannot end its block and speak as the prompt."""
    return DELIMITER.sub(lambda m: f"[{m.group(1)}{m.group(2)}]", text)


def render_judge_prompt(template: str, item: JudgeItem) -> str:
    """The judge instruction for one item (the user turn of the judge conversation)."""
    return fill(
        template,
        instruction=neutralise_delimiters(item.instruction.strip()),
        response=neutralise_delimiters(item.response.strip()),
    )


def default_template() -> str:
    return load_template(None, "judge.txt", ("instruction", "response"))


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
    ) -> None:
        if mode not in ("sampled", "expected"):
            raise ValueError(f"mode must be 'sampled' or 'expected', not {mode!r}")
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self.backend = backend
        self.template = template or default_template()
        self.mode = mode
        self.samples = samples
        sampling = sampling or Sampling(temperature=0.7, top_p=0.9, max_new_tokens=192)
        self.sampling = replace(sampling, stop=sampling.stop + SCORE_STOPS, keep_stop=True)

    def prompt(self, item: JudgeItem) -> str:
        return self.backend.chat_prompt([{"role": "user", "content": render_judge_prompt(self.template, item)}])

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

    def _expected(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        prefix, digits = "Score: ", [str(s) for s in SCORES]
        probe = self.prompt(items[0])
        token_ids = self.backend.single_token_ids(probe + prefix, digits)
        if token_ids is None:  # tokenizers that merge the space into the digit
            prefix, digits = "Score:", [f" {s}" for s in SCORES]
            token_ids = self.backend.single_token_ids(probe + prefix, digits)
        if token_ids is None:
            raise ValueError("expected mode needs the scores 0-5 to be single tokens after 'Score:'")
        probs = self.backend.next_token_probs([self.prompt(item) + prefix for item in items], token_ids)
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
        results: list[JudgeResult] = []
        with progress_bar(label, len(items)) as advance:
            for start in range(0, len(items), self.chunk):
                batch = items[start : start + self.chunk]
                results += self.score(batch)
                advance(len(batch))
        return results

    def score_file(self, items: Sequence[dict], output: Path, label: str = "judging", carry: Sequence[str] = ()) -> dict:
        """Judge `items` ({id, instruction, response, ...}) into the JSONL `output`, resumably.

        Records {id, <carry fields>, score, scores, judgments, parse_failures} are appended per chunk; ids
        already in `output` (an interrupted run) are skipped. Returns counts over the whole file.
        """
        started = time.perf_counter()
        done = {str(r["id"]) for r in resume_records(output)}
        todo = [item for item in items if str(item["id"]) not in done]
        with progress_bar(label, len(items), len(items) - len(todo)) as advance:
            for start in range(0, len(todo), self.chunk):
                batch = todo[start : start + self.chunk]
                results = self.score([JudgeItem(i["instruction"], i["response"]) for i in batch],
                                     seed=self.sampling.seed + len(done) + start)
                append_jsonl(output, (
                    {"id": item["id"], **{key: item[key] for key in carry}, "score": r.score, "scores": r.scores,
                     "judgments": r.texts, "parse_failures": r.parse_failures}
                    for item, r in zip(batch, results)
                ))
                advance(len(batch))
        records = resume_records(output)
        scored = [r["score"] for r in records if r["score"] is not None]
        return {
            "judged": len(records), "judged_now": len(todo), "unscored": len(records) - len(scored),
            "parse_failures": sum(r["parse_failures"] for r in records),
            "judge_samples": sum(len(r["scores"]) for r in records) or len(records),
            "mean_score": round(sum(scored) / len(scored), 3) if scored else None,
            "seconds": round(time.perf_counter() - started, 1),
        }

    def compare(self, instruction: str, first: str, second: str) -> float | None:
        """Score difference (first minus second) for two responses to one instruction; None if unscored."""
        a, b = self.score([JudgeItem(instruction, first), JudgeItem(instruction, second)])
        if a.score is None or b.score is None:
            return None
        return a.score - b.score
