"""Self-instruct: M_t (or a fixed prompt model) writes new instructions from few-shot seed examples.

New instructions are de-duplicated against the seeds and each other (exact after normalisation, and near:
word-bigram Jaccard similarity at or above the recipe's threshold); empty, short and over-long ones are
dropped.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.data.seeds import load_seeds
from selfreward.progress import progress_bar
from selfreward.recipe import PromptsSection
from selfreward.run.jsonl import append_jsonl, resume_records, write_jsonl_atomic
from selfreward.stages.context import StageContext
from selfreward.templates import fill, load_template

log = logging.getLogger(__name__)
TASK_PREFIX = re.compile(r"^\s*(task\s*\d*\s*[:.)-]\s*)", re.IGNORECASE)


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def bigrams(text: str) -> frozenset[str]:
    words = normalise(text).split()
    return frozenset(" ".join(pair) for pair in zip(words, words[1:])) or frozenset(words)


class DuplicateIndex:
    """Exact and near-duplicate detection; an inverted index keeps comparisons to texts sharing a bigram."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.exact: set[str] = set()
        self.shingles: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}

    def add(self, text: str) -> None:
        self.exact.add(normalise(text))
        grams = bigrams(text)
        for gram in grams:
            self.postings.setdefault(gram, []).append(len(self.shingles))
        self.shingles.append(grams)

    def is_duplicate(self, text: str) -> bool:
        if normalise(text) in self.exact:
            return True
        grams = bigrams(text)
        candidates = {i for gram in grams for i in self.postings.get(gram, ())}
        return any(len(grams & self.shingles[i]) / len(grams | self.shingles[i]) >= self.threshold for i in candidates)


def extract_instruction(text: str) -> str:
    """The generated task: the text before the next task's header, without a leading 'Task N:'."""
    text = re.split(r"\n\s*task\s*\d+\s*:", text, flags=re.IGNORECASE)[0]
    return TASK_PREFIX.sub("", text).strip()


def few_shot_prompt(template: str, examples: list[str]) -> str:
    listed = "".join(f"Task {i}: {' '.join(e.split())}\n" for i, e in enumerate(examples, start=1))
    return fill(template, examples=listed, next=str(len(examples) + 1))


def run_prompts(
    backend: Backend,
    seeds: list[str],
    config: PromptsSection,
    output: Path,
    iteration: int,
    seed_of: Callable[[int], int],
) -> dict[str, Any]:
    """Write `config.count` new instructions to `output` as {id, instruction, round} records (resumable).

    Each round samples `config.round_size` candidates with the seed `seed_of(round)` and is logged, once its
    prompts are on disk, in `<output>.rounds.jsonl`. A rerun drops prompts of a round that was not logged
    and goes on from the next round, so a killed run ends with the same prompts as an uninterrupted one.
    """
    started = time.perf_counter()
    template = load_template(config.template, "self_instruct.txt", ("examples", "next"))
    rounds_log = output.with_name(f"{output.stem}.rounds.jsonl")
    rounds = resume_records(rounds_log)
    accepted = resume_records(output)
    if any(r["round"] >= len(rounds) for r in accepted):  # a round cut short: redo it whole
        accepted = [r for r in accepted if r["round"] < len(rounds)]
        write_jsonl_atomic(output, accepted)
    index = DuplicateIndex(config.near_duplicate_threshold)
    for text in seeds + [r["instruction"] for r in accepted]:
        index.add(text)
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, stop=("\nTask",))
    with progress_bar(f"iter{iteration} prompts", config.count, len(accepted)) as advance:
        while len(accepted) < config.count and len(rounds) < config.max_rounds:
            number = len(rounds)
            rng = random.Random(seed_of(number))
            per_prompt = config.samples_per_prompt
            shots = [rng.sample(seeds, min(config.shots, len(seeds))) for _ in range(-(-config.round_size // per_prompt))]
            prompts = [backend.text_prompt(few_shot_prompt(template, s)) for s in shots]
            outputs = backend.generate(prompts, per_prompt, replace(sampling, seed=rng.randrange(2**31)))
            fresh, counts = [], {"round": number, "generated": 0, "duplicates": 0, "bad_length": 0}
            for completion in [c for row in outputs for c in row][: config.round_size]:
                counts["generated"] += 1
                instruction = extract_instruction(completion.text)
                if not config.min_chars <= len(instruction) <= config.max_chars or (
                    config.drop_unfinished and not completion.finished
                ):
                    counts["bad_length"] += 1
                elif index.is_duplicate(instruction):
                    counts["duplicates"] += 1
                elif len(accepted) + len(fresh) < config.count:
                    index.add(instruction)
                    fresh.append({"id": f"iter{iteration}-p{len(accepted) + len(fresh):05d}", "instruction": instruction,
                                  "round": number})
            append_jsonl(output, fresh)
            append_jsonl(rounds_log, [{**counts, "accepted": len(fresh)}])
            rounds.append(counts)
            accepted += fresh
            advance(len(fresh))
    if len(accepted) < config.count:
        log.warning("iter%d: only %d of %d prompts after %d rounds", iteration, len(accepted), config.count, len(rounds))
    totals = {key: sum(r[key] for r in rounds) for key in ("generated", "duplicates", "bad_length")}
    return {"prompts": len(accepted), **totals, "rounds": len(rounds), "seconds": round(time.perf_counter() - started, 1)}


def stage(ctx: StageContext) -> dict[str, Any]:
    """prompts = M_t (or the recipe's fixed prompt model) writes new instructions from seed examples."""
    recipe, t = ctx.recipe, ctx.iteration
    ift, _, truncated = load_seeds(recipe.data, recipe.seed, recipe.limits)
    result = run_prompts(ctx.backend(recipe.prompts.model), [r["instruction"] for r in ift], recipe.prompts,
                         ctx.run_dir.prompts(t), t, ctx.seed_of)
    return {**result, "seed_instructions_truncated": truncated["ift_instructions"]}
