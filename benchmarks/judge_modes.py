"""(b) Judging, side by side in one run on the same items: a plain one-forward-pass script vs our expected
mode vs sampled mode with 1 and with k samples; seconds per 100 items and agreement between modes.

    python -m benchmarks.judge_modes --model embedded:gemma3-270m --ranked ../shared/data/oasst1/sample.jsonl --prompts 20

`--ranked` takes human-ranked responses (oasst1 JSONL, as `selfreward judge-eval` reads them); every
response of the first `--prompts` prompts is one item. The plain script is what one would write by hand, on
the model as transformers loads it: batches of 4 prompts sorted by length, one forward pass with the logits
of every position, the six digit probabilities at the last one. Expected mode must agree with it (same
scores up to rounding: the `max_abs_diff_vs_plain` and `mean_abs_diff_vs_plain` columns). MFU counts prompt
tokens at 2 x parameters per token (`mfu`); expected mode skips the LM head except at the last position,
computes the rubric common to all prompts once and each instruction once for its responses, so
`mfu_computed` also gives the share with the FLOPs it really does: 2 x non-embedding parameters per token it
computes (`computed_tokens`, from the backend's `prefix_plan`; padding not counted). Sampled rows report the
Spearman correlation of their scores with expected mode and their parse-failure rate. The plain script and
expected mode run `--repeats` times, alternating; their seconds are the median run (all runs in `runs_s`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

from scipy.stats import spearmanr

from benchmarks.common import COMPUTE_DTYPE, matmul_gflops, mfu, parameters, report
from selfreward.backends import Sampling, open_backend
from selfreward.data.preferences import load_ranked
from selfreward.engine.prefill import PREFIX_GROUP_OVERHEAD_TOKENS, planned_tokens, prefix_plan
from selfreward.judge import SCORES, Judge, JudgeItem
from selfreward.models import resolve_model
from selfreward.recipe import BackendSection


def plain_script(model, backend, prompts: list[str], digit_ids: list[int]) -> list[float]:
    """Expected scores the straightforward way (see the module docstring): `model` as transformers loads it
    (its default attention), the backend's tokenizer and prompts."""
    import torch

    tokenizer = backend.tokenizer
    encoded = [backend.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    scores: list[float] = [0.0] * len(prompts)
    for start in range(0, len(order), 4):
        batch = order[start : start + 4]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")  # left padding
        positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**padded, position_ids=positions).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)[:, digit_ids]
        for i, row in zip(batch, probs.tolist()):
            scores[i] = sum(s * p for s, p in zip(SCORES, row)) / sum(row)
    return scores


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--ranked", required=True, help="oasst1-style ranked responses (JSONL)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=3, help="k of the sampled row")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the plain script and of expected mode, alternating")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/judge_modes.json"))
    args = parser.parse_args()
    model = resolve_model(args.model)
    gflops = matmul_gflops()
    params = parameters(model)
    backend = open_backend(model, BackendSection(kind="transformers", batch_size=args.batch_size))
    items = [JudgeItem(p.instruction, r) for p in load_ranked(args.ranked)[: args.prompts] for r in p.responses]
    expected = Judge(backend, mode="expected")
    prompts = [expected.prompt(item) + "Score: " for item in items]
    encoded = [backend.encode(p) for p in prompts]
    prompt_tokens = sum(map(len, encoded))
    computed_tokens = planned_tokens(encoded, *prefix_plan(encoded, PREFIX_GROUP_OVERHEAD_TOKENS))
    digit_ids = backend.single_token_ids(prompts[0], [str(s) for s in SCORES])
    expected.score(items[:2])  # warm-up

    import torch
    from transformers import AutoModelForCausalLM

    plain_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, COMPUTE_DTYPE)).eval()
    # The two alternate, so that a slow spell of the machine (these vary by a quarter within minutes) falls
    # on both; each row gives the median of its runs, and all of them.
    plain_runs, fast_runs = [], []
    for _ in range(args.repeats):
        plain, seconds = timed(plain_script, plain_model, backend, prompts, digit_ids)
        plain_runs.append(seconds)
        fast, seconds = timed(lambda: [r.score for r in expected.score(items)])
        fast_runs.append(seconds)
    del plain_model
    plain_s, fast_s = median(plain_runs), median(fast_runs)
    rows = [
        {"mode": "plain script (full logits)", "seconds": plain_s, "runs_s": [round(s, 1) for s in plain_runs]},
        {"mode": "expected", "seconds": fast_s, "runs_s": [round(s, 1) for s in fast_runs], "max_abs_diff_vs_plain": max(abs(a - b) for a, b in zip(fast, plain)),
         "mean_abs_diff_vs_plain": sum(abs(a - b) for a, b in zip(fast, plain)) / len(items)},
    ]
    for row in rows:
        row["prompt_tok_per_s"] = prompt_tokens / row["seconds"]
        row["mfu"] = mfu(row["prompt_tok_per_s"], 2 * params["total"], gflops)
    rows[1]["mfu_computed"] = mfu(computed_tokens / fast_s, 2 * params["non_embedding"], gflops)
    for k in (1, args.samples):
        judge = Judge(backend, mode="sampled", samples=k, sampling=Sampling(0.7, 0.9, args.max_new_tokens))
        results, seconds = timed(judge.score, items)
        scored = [(e, r.score) for e, r in zip(fast, results) if r.score is not None]
        rows.append({
            "mode": f"sampled k={k}", "seconds": seconds,
            "spearman_vs_expected": spearmanr(*zip(*scored)).statistic if len(scored) > 2 else None,
            "parse_failure_rate": sum(r.parse_failures for r in results) / (len(items) * k),
            "judgment_tokens": sum(len(backend.encode(t)) for r in results for t in r.texts),
        })
    for row in rows:
        row["s_per_100_items"] = 100 * row["seconds"] / len(items)
        row["vs_plain"] = row["seconds"] / plain_s
    sampled = rows[2:]
    report("(b) judging: the same items in each mode", rows, args.output, {
        "model": args.model, "items": len(items), "prompt_tokens": prompt_tokens, "computed_tokens": computed_tokens, "matmul_gflops": round(gflops, 1), "dtype": COMPUTE_DTYPE,
        "parameters": params, "sampled_k_over_k1_time": sampled[1]["seconds"] / sampled[0]["seconds"],
        "command": " ".join(sys.argv),
    })


if __name__ == "__main__":
    main()
