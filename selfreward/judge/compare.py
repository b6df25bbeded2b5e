"""Head-to-head win rates: one side's answers against another's on the same instructions, by a fixed judge.

Every item is judged in both orders, (model, baseline) shown as (A, B) and then as (B, A), with the pairwise
template; the item's preference for the model side is 1 when both orders prefer it, 0 when both prefer the
baseline, and 0.5 (a tie) when the orders disagree: a judge that favours a position cancels out instead of
deciding (MT-Bench's rule). An order without a parseable verdict is asked once more (with another seed);
still unparsed, the item is counted as unparsed and left out of the rates. In expected mode the preference is
the mean over both orders of the probability of the model side's letter (a soft preference).

The summary (rates in percent):
- `win_rate`: mean preference (ties count half), with `win_rate_ci`, a 95 % percentile bootstrap over items,
  seeded, so a rerun prints the same numbers;
- `lc_win_rate`: length-controlled, after AlpacaEval 2: a logistic model of the preference on
  tanh(character-length difference / its standard deviation) with an intercept, L2-regularised so that a
  judge that separates the items perfectly stays finite, read at zero length difference. AlpacaEval's own
  model adds an instruction-difficulty term fitted on its 805 instructions; it does not exist for other
  instruction sets and is left out here;
- `position_consistency`: the share of items whose two orders prefer the same side;
- both sides' mean answer lengths (characters).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.judge.parse import parse_winner
from selfreward.judge.scoring import Judge, render_pairwise_prompt
from selfreward.progress import progress_bar
from selfreward.run.jsonl import append_jsonl, read_jsonl, resume_records, write_json_atomic
from selfreward.run.units import unit_seed, units_of

# Items per judge call (a unit: judged, seeded and written together): enough to keep an endpoint's
# concurrent requests busy.
CHUNK = 32
# L2 penalty of the length-controlled model, per item: keeps a perfectly separating judge finite.
LC_PENALTY = 0.1
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Item:
    id: str
    instruction: str
    model: str  # the answer of the side under test
    baseline: str


def _records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one object a line)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    return read_jsonl(path)


def load_instructions(path: Path) -> list[str]:
    """Instructions: a JSON list or JSONL of objects with `instruction` (AlpacaEval's format), or a JSON list
    of strings."""
    instructions = []
    for number, record in enumerate(_records(path), start=1):
        value = record if isinstance(record, str) else record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{path}: record {number}: expected a string field 'instruction'")
        instructions.append(value)
    if not instructions:
        raise UserError(f"{path}: no instructions")
    return instructions


def load_answers(path: Path, instructions: Sequence[str]) -> list[str]:
    """One answer per instruction from `{instruction, output}` records (AlpacaEval's model_outputs.json),
    matched by instruction text; every instruction must have one."""
    answers: dict[str, str] = {}
    for number, record in enumerate(_records(path), start=1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
            raise UserError(f"{path}: record {number}: expected string fields 'instruction' and 'output'")
        answers[record["instruction"]] = record["output"]
    missing = [i for i, text in enumerate(instructions, start=1) if text not in answers]
    if missing:
        raise UserError(f"{path}: no answer for {len(missing)} of {len(instructions)} instructions "
                        f"(the first is instruction {missing[0]}); answers are matched by instruction text")
    return [answers[text] for text in instructions]


def generate_answers(backend, instructions: Sequence[str], max_new_tokens: int, label: str) -> list[str]:
    """One greedy answer per instruction from a backend's model, as the user's turn of its chat template."""
    from selfreward.backends.base import Sampling

    prompts = [backend.chat_prompt([{"role": "user", "content": text}]) for text in instructions]
    outputs: list[str] = []
    with progress_bar(label, len(prompts)) as advance:
        for start in range(0, len(prompts), backend.chunk_prompts):
            chunk = prompts[start : start + backend.chunk_prompts]
            outputs += [row[0].text for row in backend.generate(chunk, 1, Sampling(temperature=0.0, max_new_tokens=max_new_tokens))]
            advance(len(chunk))
    return outputs


def write_answers(path: Path, instructions: Sequence[str], outputs: Sequence[str], generator: str) -> None:
    """Answers in AlpacaEval's model_outputs.json format, so that its own judges can read them too."""
    write_json_atomic(path, [{"instruction": i, "output": o, "generator": generator} for i, o in zip(instructions, outputs)])


def _order_prompts(judge: Judge, item: Item) -> list[str]:
    """The two orders' judge prompts: (model, baseline) as (A, B), then (baseline, model)."""
    orders = ((item.model, item.baseline), (item.baseline, item.model))
    contents = [render_pairwise_prompt(judge.pairwise_template, item.instruction, first, second, judge.control, judge.defence)
                for first, second in orders]
    return [judge.backend.chat_prompt([{"role": "user", "content": content}]) for content in contents]


def _sampled_verdicts(judge: Judge, prompts: list[str], seed: int) -> list[str | None]:
    """One verdict per prompt ("A", "B" or None); prompts without one are asked once more."""
    sampling = replace(judge.pairwise_sampling, seed=seed)
    verdicts = [parse_winner(row[0].text) for row in judge.backend.generate(prompts, 1, sampling)]
    again = [i for i, v in enumerate(verdicts) if v is None]
    if again:
        retry = replace(sampling, seed=unit_seed(seed, "compare-retry", 0, "0"))
        for i, row in zip(again, judge.backend.generate([prompts[i] for i in again], 1, retry)):
            verdicts[i] = parse_winner(row[0].text)
    return verdicts


def _record(item: Item, forward: Any, backward: Any, soft: bool) -> dict[str, Any]:
    """forward / backward: the verdict letter (sampled) or P(A) (expected) of the two orders."""
    if soft:  # the model side is A in the forward order and B in the backward one
        wins = [forward, None if backward is None else 1 - backward]
        preference = None if None in wins else (wins[0] + wins[1]) / 2
        consistent = None if preference is None else (wins[0] > 0.5) == (wins[1] > 0.5)
    else:
        wins = [None if forward is None else float(forward == "A"), None if backward is None else float(backward == "B")]
        preference = None if None in wins else (wins[0] + wins[1]) / 2  # orders that disagree: 0.5, a tie
        consistent = None if preference is None else wins[0] == wins[1]
    return {"id": item.id, "verdicts": [forward, backward], "preference": preference, "consistent": consistent,
            "model_chars": len(item.model), "baseline_chars": len(item.baseline)}


def item_id(instruction: str, model: str, baseline: str) -> str:
    """An item's id, from what is judged: a rerun on changed answers never reuses a stale verdict."""
    return hashlib.sha256(json.dumps([instruction, model, baseline]).encode()).hexdigest()[:16]


def compare(judge: Judge, items: Sequence[Item], verdicts_path: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Judge every item in both orders, in units of CHUNK items, each sampled with a seed of its own (from
    `seed` and its first item); a unit's records are appended to the JSONL `verdicts_path` together, and a
    rerun judges only the units not yet there, so an interrupted run ends as an uninterrupted one.
    Returns the records in item order."""
    done = {r["id"]: r for r in resume_records(verdicts_path)}
    units = [unit for unit in units_of(list(items), CHUNK) if not all(item.id in done for item in unit)]
    with progress_bar("comparing", len(items), len(items) - sum(len(u) for u in units)) as advance:
        for unit in units:
            prompts = [p for item in unit for p in _order_prompts(judge, item)]
            if judge.mode == "expected":
                probs = judge._forced_answer(prompts, "Winner:", ["A", "B"])
                answers: list[Any] = [a / (a + b) if a + b > 0 else None for a, b in probs]
            else:
                answers = _sampled_verdicts(judge, prompts, unit_seed(seed, "compare", 0, unit[0].id))
            records = [_record(item, answers[2 * i], answers[2 * i + 1], judge.mode == "expected") for i, item in enumerate(unit)]
            append_jsonl(verdicts_path, records)
            done.update((r["id"], r) for r in records)
            advance(len(unit))
    return [done[item.id] for item in items]


def lc_win_rate(preferences: Sequence[float], model_chars: Sequence[int], baseline_chars: Sequence[int],
                penalty: float = LC_PENALTY) -> float | None:
    """The preference for the model side at zero length difference, in percent (see the module docstring)."""
    import numpy as np

    if not preferences:
        return None
    y = np.asarray(preferences, dtype=float)
    difference = np.asarray(model_chars, dtype=float) - np.asarray(baseline_chars, dtype=float)
    scale = difference.std()
    x = np.tanh(difference / scale) if scale > 0 else np.zeros_like(difference)
    features = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    lam = penalty * len(y) ** 0.5  # the penalty's weight against the n terms of the likelihood
    for _ in range(100):  # Newton's method on the penalised cross-entropy (convex; soft labels allowed)
        p = 1 / (1 + np.exp(-features @ theta))
        gradient = features.T @ (p - y) + lam * theta
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + lam * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(100 / (1 + math.exp(-theta[0])))


def summarize(records: Sequence[dict[str, Any]], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Counts and rates over compared items (rates in percent, None where no item has a verdict)."""
    import numpy as np

    scored = [r for r in records if r["preference"] is not None]
    preferences = np.asarray([r["preference"] for r in scored], dtype=float)
    n = len(scored)
    summary: dict[str, Any] = {
        "n": n, "unparsed": len(records) - n,
        "wins": int((preferences > 0.5).sum()), "ties": int((preferences == 0.5).sum()), "losses": int((preferences < 0.5).sum()),
        "win_rate": None, "win_rate_ci": None, "lc_win_rate": None, "position_consistency": None,
        "model_mean_chars": round(float(np.mean([r["model_chars"] for r in records])), 1) if records else None,
        "baseline_mean_chars": round(float(np.mean([r["baseline_chars"] for r in records])), 1) if records else None,
    }
    if n:
        rng = np.random.default_rng(seed)
        means = preferences[rng.integers(0, n, size=(samples, n))].mean(axis=1)
        summary.update(
            win_rate=round(100 * float(preferences.mean()), 2),
            win_rate_ci=[round(100 * float(np.percentile(means, 2.5)), 2), round(100 * float(np.percentile(means, 97.5)), 2)],
            lc_win_rate=round(lc_win_rate(preferences.tolist(), [r["model_chars"] for r in scored],
                                          [r["baseline_chars"] for r in scored]), 2),
            position_consistency=round(100 * float(np.mean([bool(r["consistent"]) for r in scored])), 2),
        )
    return summary


def run_compare(judge: Judge, items: Sequence[Item], output: Path, seed: int = 0,
                describe: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """`compare`, then the summary and every item's record written to the JSON `output` (the verdicts'
    JSONL beside it, `<output>.verdicts.jsonl`, is what an interrupted run resumes from)."""
    started = time.perf_counter()
    records = compare(judge, items, verdicts_file(output), seed)
    summary = summarize(records, seed)
    write_json_atomic(output, {"summary": summary, **(describe() if describe else {}), "items": records,
                               "seconds": round(time.perf_counter() - started, 1)})
    return summary


def verdicts_file(output: Path) -> Path:
    return output.with_name(output.name + ".verdicts.jsonl")
