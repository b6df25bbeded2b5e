"""Can a response talk the judge into a higher score? Each attack of tests/data/judge_attacks.jsonl is
applied to the same honest answers; the table shows the judge's mean score per attack and its change
from the clean answers, with the judge's defences on and, for comparison, switched off.

    python benchmarks/judge_attacks.py --model embedded:gemma3-270m --mode expected --answers 8
    python benchmarks/judge_attacks.py --model runs/demo/m1 --mode sampled --answers 4 --attacks appended_score gemma_turns

"Defences off" renders the judged text as it is (no delimiter rewriting, no control-token breaking).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_attacks() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "tests" / "data" / "judge_attacks.jsonl").read_text().splitlines()]


def honest_answers(count: int, max_chars: int) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in (ROOT / "data" / "ift.jsonl").read_text().splitlines()]
    return [(r["instruction"], r["response"][:max_chars]) for r in records[:count]]


def undefended(text: str, control=None) -> str:
    """No defence at all: judged text goes into the prompt as it is."""
    return text.strip()


def main() -> None:
    from selfreward.backends import open_backend
    from selfreward.backends.base import Sampling
    from selfreward.judge import Judge, JudgeItem
    from selfreward.models import resolve_model
    from selfreward.recipe import BackendSection

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--mode", choices=["expected", "sampled"], default="expected")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=400, help="Cut each honest answer to this length.")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--attacks", nargs="*", help="Only these attack ids (default: the whole corpus).")
    parser.add_argument("--output", type=Path, help="Also write the table as JSON.")
    args = parser.parse_args()

    backend = open_backend(str(resolve_model(args.model)), BackendSection(kind="transformers"))
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens)
    judges = {enabled: Judge(backend, mode=args.mode, samples=args.samples, sampling=sampling,
                             defence=None if enabled else undefended) for enabled in (True, False)}
    answers = honest_answers(args.answers, args.max_chars)
    chosen = [a for a in load_attacks() if not args.attacks or a["id"] in args.attacks]
    attacks = [{"id": "clean", "template": "{answer}"}] + chosen
    rows = []
    started = time.perf_counter()
    for attack in attacks:
        items = [JudgeItem(q, attack["template"].replace("{answer}", a)) for q, a in answers]
        row = {"attack": attack["id"]}
        for enabled in (True, False):
            results = judges[enabled].score(items, seed=0)
            scores = [r.score for r in results if r.score is not None]
            row["on" if enabled else "off"] = round(sum(scores) / len(scores), 3) if scores else None
            row[f"unscored_{'on' if enabled else 'off'}"] = len(items) - len(scores)
        rows.append(row)
        print(json.dumps(row), flush=True)
    clean = rows[0]
    print(f"\n{args.model}, {args.mode} mode, {len(answers)} answers, {time.perf_counter() - started:.0f} s")
    print(f"{'attack':<22}{'defences on':>14}{'change':>9}{'defences off':>15}{'change':>9}")
    for row in rows:
        changes = [row[k] - clean[k] if row[k] is not None and clean[k] is not None else None for k in ("on", "off")]
        cells = [f"{v:>14.2f}" if v is not None else f"{'-':>14}" for v in (row["on"],)]
        print(f"{row['attack']:<22}{cells[0]}{_signed(changes[0])}{_num(row['off']):>15}{_signed(changes[1])}")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))


def _num(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _signed(value: float | None) -> str:
    return f"{value:>+9.2f}" if value is not None else f"{'-':>9}"


if __name__ == "__main__":
    main()
