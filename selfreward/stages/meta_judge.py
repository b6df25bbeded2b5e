"""Meta-judging (Meta-Rewarding, Wu et al. 2024): M_t judges its own judgments, giving judge-training pairs.

Per prompt, the candidate whose judge scores spread most (population variance of its parsed scores; ties
broken by a generator seeded from the recipe seed and the prompt id) has every two of its parsed judgments
compared by the meta-judge prompt (`templates/meta_judge.txt`; the judgments' score lines hidden), in both
orders. A battle is won only when both orders name the same judgment; otherwise it is left out. Elo over
the won battles (start 1000, K = 32, in the order the pairs are listed) ranks the judgments: the highest
against the lowest becomes a pair {prompt: the judge prompt, chosen, rejected}. Prompts where no candidate's
scores differ, or no battle was won, give none.

`iter{t}/meta_judgments.jsonl` keeps one record per prompt (the battles, verdicts and Elo), appended a unit
of prompts at a time, so an interrupted stage resumes. `iter{t}/judge_pairs.jsonl` is then written from it
at once: pairs longer than dpo.max_length tokens dropped (counted), at most meta_judge.max_per_score per
score of the chosen judgment, and at most meta_judge.share of everything DPO trains on.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.data.limits import limit_lengths
from selfreward.judge.hygiene import control_tokens, neutralise
from selfreward.judge.parse import LABEL, WINNER_STOPS, parse_winner
from selfreward.judge.scoring import JudgeItem, load_judge_template, render_judge_prompt
from selfreward.progress import progress_bar
from selfreward.run.jsonl import append_jsonl, read_jsonl, write_jsonl_atomic
from selfreward.run.units import resume_units, units_of
from selfreward.stages.context import StageContext
from selfreward.templates import fill, load_template

log = logging.getLogger(__name__)
ELO_START, ELO_K = 1000.0, 32.0
# A judgment's score line, hidden from the meta-judge so that it weighs the reasoning.
SCORE_LINE = re.compile(LABEL.pattern + r"[^\n]*", re.IGNORECASE)


def load_meta_template(path: str | None = None) -> str:
    return load_template(path, "meta_judge.txt", ("instruction", "response", "judgment_a", "judgment_b"))


def most_disputed(candidates: list[dict], rng: random.Random) -> dict | None:
    """The candidate whose parsed judge scores spread most (at least two of them, not all equal), or None."""
    spreads = []
    for candidate in candidates:
        scores = [s for s in candidate["scores"] if s is not None]
        if len(scores) >= 2:
            centre = sum(scores) / len(scores)
            spreads.append((sum((s - centre) ** 2 for s in scores) / len(scores), candidate))
    widest = max((spread for spread, _ in spreads), default=0)
    if widest == 0:
        return None
    return rng.choice([c for spread, c in spreads if spread == widest])


def elo(count: int, battles: list[tuple[int, int]]) -> list[float]:
    """Elo ratings of `count` players after `battles` (winner, loser), in order."""
    ratings = [ELO_START] * count
    for winner, loser in battles:
        expected = 1 / (1 + 10 ** ((ratings[loser] - ratings[winner]) / 400))
        ratings[winner] += ELO_K * (1 - expected)
        ratings[loser] -= ELO_K * (1 - expected)
    return ratings


def hide_score(judgment: str) -> str:
    return SCORE_LINE.sub("", judgment).rstrip()


def meta_judge_unit(backend: Backend, template: str, items: list[dict], sampling: Sampling) -> list[dict]:
    """One record per item {prompt_id, response_id, judgments, scores, battles, elo}: every two judgments of
    its disputed candidate compared in both orders, all prompts in one backend call."""
    control = control_tokens(backend.tokenizer) if getattr(backend, "tokenizer", None) is not None else None
    prompts, where = [], []
    for index, item in enumerate(items):
        texts = item["judgments"]
        for a in range(len(texts)):
            for b in range(a + 1, len(texts)):
                for first, second in ((a, b), (b, a)):
                    content = fill(template, instruction=neutralise(item["instruction"], control), response=neutralise(item["response"], control),
                                   judgment_a=neutralise(hide_score(texts[first]), control),
                                   judgment_b=neutralise(hide_score(texts[second]), control))
                    prompts.append(backend.chat_prompt([{"role": "user", "content": content}]))
                    where.append((index, first, second))
    verdicts: dict[tuple[int, int, int], str | None] = {}
    if prompts:
        for key, completions in zip(where, backend.generate(prompts, 1, sampling)):
            verdicts[key] = parse_winner(completions[0].text)
    records = []
    for index, item in enumerate(items):
        battles, asked, count = [], [], len(item["judgments"])
        for a in range(count):
            for b in range(a + 1, count):
                forward, backward = verdicts[(index, a, b)], verdicts[(index, b, a)]
                asked.append([a, b, forward, backward])  # the verdicts with a shown first, then b first
                if forward == "A" and backward == "B":
                    battles.append([a, b])
                elif forward == "B" and backward == "A":
                    battles.append([b, a])
        records.append({"prompt_id": item["prompt_id"], "response_id": item["response_id"], "scores": item["scores"],
                        "verdicts": asked, "battles": battles, "undecided": len(asked) - len(battles),
                        "elo": [round(r, 3) for r in elo(count, [tuple(x) for x in battles])]})
    return records


def judge_pairs(records: list[dict], items: dict[str, dict], render: Callable[[dict], str], token_count: Callable[[str, str], int],
                max_length: int, answer_pairs: int, share: float, max_per_score: int | None, seed: int) -> tuple[list[dict], dict[str, int]]:
    """The judge-training pairs from the meta-judgments, and what was left out (see the module docstring).
    `render(item)` is the judge prompt the item's judgments answered; `token_count(prompt, answer)` the
    tokens DPO reads of one side."""
    pairs, too_long = [], 0
    for record in records:
        if not record["battles"]:
            continue
        ratings = record["elo"]
        best = max(range(len(ratings)), key=lambda i: (ratings[i], -i))
        worst = min(range(len(ratings)), key=lambda i: (ratings[i], i))
        item = items[record["prompt_id"]]
        content = render(item)
        chosen, rejected = item["judgments"][best], item["judgments"][worst]
        if max(token_count(content, chosen), token_count(content, rejected)) > max_length:
            too_long += 1
            continue
        pairs.append({
            "id": f"{record['prompt_id']}-judge", "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}],
            "response_id": record["response_id"], "chosen_judgment": best, "rejected_judgment": worst,
            "chosen_elo": ratings[best], "rejected_elo": ratings[worst],
            "chosen_score": record["scores"][best], "rejected_score": record["scores"][worst],
        })
    rng = random.Random(f"{seed}:meta-judge")
    over_bucket = 0
    if max_per_score is not None:
        kept, per_score = [], {}
        for pair in rng.sample(pairs, len(pairs)):
            if per_score.get(pair["chosen_score"], 0) < max_per_score:
                per_score[pair["chosen_score"]] = per_score.get(pair["chosen_score"], 0) + 1
                kept.append(pair)
        over_bucket = len(pairs) - len(kept)
        chosen_ids = {id(p) for p in kept}
        pairs = [p for p in pairs if id(p) in chosen_ids]
    # judge pairs / (answer pairs + judge pairs) <= share
    room = int(share * answer_pairs / (1 - share) + 1e-9)
    over_share = max(0, len(pairs) - room)
    if over_share:
        keep = set(id(p) for p in rng.sample(pairs, room))
        pairs = [p for p in pairs if id(p) in keep]
    return pairs, {"too_long_dropped": too_long, "over_score_cap_dropped": over_bucket, "over_share_dropped": over_share}


def stage(ctx: StageContext) -> dict[str, Any]:
    """judge pairs = M_t's best vs worst judgment (by Elo over meta-judge battles) of each prompt's most
    disputed candidate."""
    started = time.perf_counter()
    t, recipe, run_dir = ctx.iteration, ctx.recipe, ctx.run_dir
    config = recipe.meta_judge
    responses, _ = limit_lengths(read_jsonl(run_dir.responses(t)), recipe.limits.max_instruction_chars,
                                 recipe.limits.max_response_chars, "meta-judged")
    judged = {j["id"]: j for j in read_jsonl(run_dir.judgments(t))}
    by_prompt: dict[str, list[dict]] = {}
    for r in responses:
        j = judged.get(r["id"], {})
        by_prompt.setdefault(r["prompt_id"], []).append({**r, "scores": j.get("scores", []), "judgments": j.get("judgments", [])})
    items = []
    for prompt_id, candidates in by_prompt.items():
        chosen = most_disputed(candidates, random.Random(f"{recipe.seed}:{prompt_id}"))
        if chosen is not None:
            parsed = [i for i, s in enumerate(chosen["scores"]) if s is not None]
            items.append({"id": prompt_id, "prompt_id": prompt_id, "response_id": chosen["id"], "instruction": chosen["instruction"],
                          "response": chosen["response"], "judgments": [chosen["judgments"][i] for i in parsed],
                          "scores": [chosen["scores"][i] for i in parsed]})
    output = run_dir.meta_judgments(t)
    units = units_of(items, config.unit_size)
    done = resume_units(output, units, "prompt_id")
    template = load_meta_template(config.template)
    base = Sampling(recipe.judge.temperature, recipe.judge.top_p, config.max_new_tokens)
    base = replace(base, stop=base.stop + WINNER_STOPS, keep_stop=True)
    backend = ctx.backend()
    with progress_bar(f"iter{t} meta-judge", len(items), sum(len(u) for u in units[:done])) as advance:
        for unit in units[done:]:
            append_jsonl(output, meta_judge_unit(backend, template, unit, replace(base, seed=ctx.seed_of(unit[0]["id"]))))
            advance(len(unit))
    records = read_jsonl(output) if output.exists() else []
    answer_pairs = len(read_jsonl(run_dir.pairs(t)))
    judge_template = load_judge_template(recipe.judge.template)
    control = control_tokens(backend.tokenizer) if getattr(backend, "tokenizer", None) is not None else None
    pairs, dropped = judge_pairs(
        records, {i["prompt_id"]: i for i in items},
        lambda item: render_judge_prompt(judge_template, JudgeItem(item["instruction"], item["response"]), control),
        lambda prompt, answer: len(backend.encode(backend.chat_prompt([{"role": "user", "content": prompt}]) + answer)),
        recipe.dpo.max_length, answer_pairs, config.share, config.max_per_score, recipe.seed,
    )
    write_jsonl_atomic(run_dir.judge_pairs(t), pairs)
    log.info("meta-judge: %d judge pairs beside %d answer pairs (%d disputed prompts)", len(pairs), answer_pairs, len(items))
    verdicts = [v for r in records for _, _, *order in r["verdicts"] for v in order]
    return {"disputed_prompts": len(items), "battles_decided": sum(len(r["battles"]) for r in records),
            "battles_undecided": sum(r["undecided"] for r in records), "verdicts_unparsed": verdicts.count(None),
            "verdicts_first_shown_wins": verdicts.count("A"), "verdicts": len(verdicts),
            "judge_pairs": len(pairs), **dropped,
            "seconds": round(time.perf_counter() - started, 1)}
