"""(f) Self-instruct, side by side in one run: accepted prompts per second as `prompts.samples_per_prompt` varies,
with the same seeds, model, recipe section and count.

    python -m benchmarks.prompt_acceptance --recipe recipes/demo-cpu.yaml --count 16 --samples 1 4

Most candidates of a 270M prompt writer copy one of its few-shot examples and are dropped as duplicates, so
what a user pays for is seconds per *accepted* prompt, not per candidate. Drawing several candidates from one
few-shot prompt computes that prompt (most of the work of a short candidate) once for all of them, at the cost
of fewer distinct shot sets per round. Per row: wall seconds of the stage (model load excluded), rounds,
candidates, duplicates, bad lengths, accepted prompts, accepted per second and the share of candidates kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from selfreward.allocator import keep_freed_memory
from selfreward.backends import open_backend
from selfreward.data.seeds import load_seeds
from selfreward.models import resolve_model
from selfreward.recipe import load_recipe
from selfreward.stages.prompts import run_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-cpu.yaml"))
    parser.add_argument("--count", type=int, default=16, help="prompts to accept in each row")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="samples_per_prompt of each row")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/prompt_acceptance.json"))
    args = parser.parse_args()
    keep_freed_memory()
    recipe = load_recipe(args.recipe)
    ift, _, _ = load_seeds(recipe.data, recipe.seed, recipe.limits)
    seeds = [r["instruction"] for r in ift]
    model = resolve_model(recipe.prompts.model or recipe.model.base)
    backend = open_backend(model, recipe.backend)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for samples in args.samples:
            section = recipe.prompts.model_copy(update={"count": args.count, "samples_per_prompt": samples})
            started = time.perf_counter()
            result = run_prompts(backend, seeds, section, Path(scratch) / f"prompts-{samples}.jsonl", 1,
                                 lambda number: recipe.seed * 1000 + number)
            seconds = time.perf_counter() - started
            rows.append({
                "samples_per_prompt": samples, "seconds": seconds, "rounds": result["rounds"],
                "candidates": result["generated"], "duplicates": result["duplicates"], "bad_length": result["bad_length"],
                "accepted": result["prompts"], "accepted_per_s": result["prompts"] / seconds,
                "kept_share": result["prompts"] / max(1, result["generated"]),
            })
    backend.close()
    for row in rows:
        row["vs_first"] = row["accepted_per_s"] / rows[0]["accepted_per_s"]
    report("(f) self-instruct: accepted prompts per second", rows, args.output, {
        "recipe": str(args.recipe), "model": recipe.prompts.model or recipe.model.base, "count": args.count,
        "round_size": recipe.prompts.round_size, "shots": recipe.prompts.shots, "command": " ".join(sys.argv),
    })


if __name__ == "__main__":
    main()
