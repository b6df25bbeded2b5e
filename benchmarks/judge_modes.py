"""The judge's two modes side by side on the same items: speed and agreement.

    python benchmarks/judge_modes.py --model embedded:gemma3-270m --ranked ../shared/data/oasst1/sample.jsonl --prompts 20

Scores every response of the first N ranked prompts with `sampled` (k samples) and with `expected`, then
reports seconds per 100 judged items for each mode, their ratio, the Spearman correlation between the two
modes' scores (items where sampled parsed), and the parse-failure rate of sampled mode.
"""

from __future__ import annotations

import argparse
import json
import time

from scipy.stats import spearmanr

from selfreward.backends import Sampling, open_backend
from selfreward.evaluation import load_ranked
from selfreward.judge import Judge, JudgeItem
from selfreward.models import resolve_model
from selfreward.recipe import BackendSection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--ranked", required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    backend = open_backend(resolve_model(args.model), BackendSection(kind="transformers", dtype="bfloat16", batch_size=48))
    items = [JudgeItem(p.instruction, r) for p in load_ranked(args.ranked)[: args.prompts] for r in p.responses]
    row = {"model": args.model, "items": len(items), "samples": args.samples}
    scores = {}
    for mode in ("expected", "sampled"):
        judge = Judge(backend, mode=mode, samples=args.samples, sampling=Sampling(0.7, 0.9, args.max_new_tokens))
        chunk = 16
        started = time.perf_counter()
        results = [r for start in range(0, len(items), chunk) for r in judge.score(items[start : start + chunk])]
        seconds = time.perf_counter() - started
        row[f"{mode}_s_per_100"] = round(100 * seconds / len(items), 1)
        scores[mode] = [r.score for r in results]
        if mode == "sampled":
            row["sampled_parse_failure_rate"] = round(sum(r.parse_failures for r in results) / (len(items) * args.samples), 3)
    both = [(e, s) for e, s in zip(scores["expected"], scores["sampled"]) if e is not None and s is not None]
    row["items_both_scored"] = len(both)
    row["spearman_sampled_vs_expected"] = round(spearmanr(*zip(*both)).statistic, 3) if len(both) > 2 else None
    row["sampled_over_expected_time"] = round(row["sampled_s_per_100"] / row["expected_s_per_100"], 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
