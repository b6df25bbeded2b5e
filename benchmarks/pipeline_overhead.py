"""(e) Pipeline overhead: a stage's wall time vs the raw engine calls inside it.

    python -m benchmarks.pipeline_overhead --model embedded:gemma3-270m

Runs iteration 1's `prompts`, `generate` and `judge` stages once, each through `loop.run_stage` exactly
as `selfreward iterate` does, with a recipe based on `recipes/demo-cpu.yaml` (the model under test as
`model.base` and `prompts.model`; `sft.enabled: false`, so M1 is the base model and nothing is trained).
SFT and DPO are training, not engine calls, and are left out.

The model is opened through the pipeline's own injection point (`Models(recipe, opener)`): the opener
times the model load and wraps the backend so that the seconds spent inside `generate` and
`next_token_probs` (the raw engine calls) are added up. Per stage:

    wall_s      around `run_stage` (locks, reading inputs, prompt rendering, writing, done records, ...)
    load_s      opening the model (the opener call); the stages of one iteration share one load
    engine_s    inside `generate` / `next_token_probs` (the backend's own tokenising and decoding included)
    overhead_s  wall_s - load_s - engine_s: what the pipeline adds around the engine
    render_s    part of overhead_s: the backend's prompt helpers (chat_prompt, text_prompt, encode, ...)

`overhead_pct` is overhead_s / wall_s; `overhead_pct_excl_load` leaves the load out of the denominator.
Goal: pipeline overhead <= 5 % of a stage's wall time. One run, so the figures are one sample each.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import report
from selfreward import loop
from selfreward.backends import Backend, Completion, Sampling, open_backend
from selfreward.errors import UserError
from selfreward.models import resolve_model
from selfreward.recipe import Recipe, parse_recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from selfreward.stages import BY_NAME, Stage
from selfreward.stages.context import Models

STAGES = ("prompts", "generate", "judge")  # the engine-bound stages of one iteration
ITERATION = 1
GOAL_PCT = 5.0


class Clock:
    """Seconds and calls added up per bucket ("load", "engine", "render") until `take` empties it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.prompts = 0

    def add(self, bucket: str, seconds: float) -> None:
        self.seconds[bucket] = self.seconds.get(bucket, 0.0) + seconds
        self.calls[bucket] = self.calls.get(bucket, 0) + 1

    def take(self) -> dict[str, Any]:
        taken = {"seconds": self.seconds, "calls": self.calls, "prompts": self.prompts}
        self.seconds, self.calls, self.prompts = {}, {}, 0
        return taken


class TimedBackend(Backend):
    """Delegates everything to the real backend and times what it does on the clock.

    The prompt helpers are delegated too (a backend may override them, e.g. the HTTP one), and timed
    apart from the engine calls, so that prompt rendering shows as a part of the pipeline's overhead.
    """

    def __init__(self, inner: Backend, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock
        self.tokenizer = inner.tokenizer
        self.chunk_prompts = inner.chunk_prompts

    def _timed(self, bucket: str, call, *args):
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.clock.add(bucket, time.perf_counter() - started)

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        self.clock.prompts += len(prompts)
        return self._timed("engine", self.inner.generate, prompts, n, sampling)

    def next_token_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        self.clock.prompts += len(prompts)
        return self._timed("engine", self.inner.next_token_probs, prompts, token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._timed("render", self.inner.chat_prompt, messages)

    def text_prompt(self, text: str) -> str:
        return self._timed("render", self.inner.text_prompt, text)

    def encode(self, prompt: str) -> list[int]:
        return self._timed("render", self.inner.encode, prompt)

    def single_token_ids(self, context: str, candidates: Sequence[str]) -> list[int] | None:
        return self._timed("render", self.inner.single_token_ids, context, candidates)

    def close(self) -> None:
        self.inner.close()


def timed_opener(clock: Clock):
    """A `BackendOpener` around the real `open_backend`: the load is timed, the backend wrapped."""

    def opener(model_path: str, backend_config, seed: int = 0, trust_remote_code: bool = False) -> Backend:
        started = time.perf_counter()
        backend = open_backend(model_path, backend_config, seed, trust_remote_code)
        clock.add("load", time.perf_counter() - started)
        return TimedBackend(backend, clock)

    return opener


def benchmark_recipe(path: Path, model: str, prompts: int | None, settings: Sequence[str]) -> Recipe:
    """The recipe file with the model under test, no SFT (M1 = the base model, see `RunDir.model_for`),
    one iteration, and the command line's overrides (`--prompts`, `--set section.key=value`)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["iterations"] = ITERATION
    raw.setdefault("model", {})["base"] = model
    raw.setdefault("prompts", {})["model"] = model  # same reference: generate and judge share the prompts stage's load
    raw.setdefault("sft", {})["enabled"] = False
    if prompts is not None:
        raw["prompts"]["count"] = prompts
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals:
            sys.exit(f"--set {setting}: expected SECTION.KEY=VALUE")
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return parse_recipe(raw, f"{path} (as changed by the benchmark)")


def fresh_run_dir(path: Path | None) -> RunDir:
    """A run directory with nothing done yet: a finished stage would be skipped and time nothing."""
    if path is None:
        return RunDir(Path(tempfile.mkdtemp(prefix="pipeline-overhead-")) / "run")
    if path.exists() and any(path.iterdir()):
        sys.exit(f"--run-dir {path}: not empty; pass a new or empty directory (finished stages would be skipped)")
    return RunDir(path)


def records_written(run_dir: RunDir, stage: Stage) -> int:
    (name,) = stage.writes
    output = getattr(run_dir, name)(ITERATION)
    return len(read_jsonl(output)) if output.exists() else 0


def stage_row(name: str, wall: float, clock: dict[str, Any], records: int) -> dict[str, Any]:
    load = clock["seconds"].get("load", 0.0)
    engine = clock["seconds"].get("engine", 0.0)
    overhead = wall - load - engine
    return {
        "stage": name, "wall_s": round(wall, 4), "load_s": round(load, 4), "engine_s": round(engine, 4),
        "overhead_s": round(overhead, 4), "render_s": round(clock["seconds"].get("render", 0.0), 4),
        "overhead_pct": round(100 * overhead / wall, 2) if wall > 0 else None,
        "overhead_pct_excl_load": round(100 * overhead / (wall - load), 2) if wall > load else None,
        "engine_calls": clock["calls"].get("engine", 0), "engine_prompts": clock["prompts"], "records": records,
    }


def total_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = {key: sum(r[key] for r in rows) for key in ("wall_s", "load_s", "engine_s", "overhead_s", "render_s")}
    wall, load, overhead = seconds["wall_s"], seconds["load_s"], seconds["overhead_s"]
    return {
        "stage": "total", **{key: round(value, 4) for key, value in seconds.items()},
        "overhead_pct": round(100 * overhead / wall, 2) if wall > 0 else None,
        "overhead_pct_excl_load": round(100 * overhead / (wall - load), 2) if wall > load else None,
        **{key: sum(r[key] for r in rows) for key in ("engine_calls", "engine_prompts", "records")},
    }


def run_stages(recipe: Recipe, run_dir: RunDir) -> list[dict[str, Any]]:
    """The engine-bound stages of iteration 1, set up the way `loop.run` sets up the loop."""
    clock = Clock()
    loop.warn_remote_code(recipe)
    run_dir.bind_recipe(recipe)
    rows = []
    with run_dir.hold("iterate"), Models(recipe, timed_opener(clock)) as models:
        for name in STAGES:
            stage = BY_NAME[name]
            clock.take()  # nothing before the stage counts toward it
            started = time.perf_counter()
            loop.run_stage(stage, recipe, run_dir, ITERATION, models)
            wall = time.perf_counter() - started
            rows.append(stage_row(name, wall, clock.take(), records_written(run_dir, stage)))
    return rows


def main() -> None:
    try:
        measure(parse_args())
    except UserError as error:  # a bad recipe, model or --set value: one line, as the CLI prints it
        sys.exit(f"error: {error}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:gemma3-270m",
                        help="model under test: a hub id, a local directory or embedded:... (default: %(default)s)")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-cpu.yaml"),
                        help="recipe the run is based on; its data paths are relative to the current directory (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=None, help="new or empty run directory (default: a fresh temporary one)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/pipeline_overhead.json"),
                        help="JSON file of results (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts.count: fewer prompts for a quicker run (default: the recipe's)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one recipe value (YAML), e.g. --set prompts.drop_unfinished=false; repeatable")
    return parser.parse_args()


def measure(args: argparse.Namespace) -> None:
    # Resolved before the run: converting the embedded model (first use only) must not count as a load.
    model_path = resolve_model(args.model)
    recipe = benchmark_recipe(args.recipe, model_path, args.prompts, args.settings)
    loop.check_inputs(recipe, str(args.recipe))
    run_dir = fresh_run_dir(args.run_dir)
    rows = run_stages(recipe, run_dir)
    rows.append(total_row(rows))
    stages = rows[:-1]
    extra = {
        "model": args.model, "model_path": model_path, "run_dir": str(run_dir.root),
        "command": shlex.join(["python", "-m", "benchmarks.pipeline_overhead", *sys.argv[1:]]),
        "goal": f"overhead_pct <= {GOAL_PCT} in every stage",
        "goal_met": all(r["overhead_pct"] is not None and r["overhead_pct"] <= GOAL_PCT for r in stages),
        "goal_met_excl_load": all(r["overhead_pct_excl_load"] is not None and r["overhead_pct_excl_load"] <= GOAL_PCT
                                  for r in stages),
        "recipe": recipe.model_dump(mode="json"),
    }
    report("Pipeline overhead: stage wall time vs raw engine calls (iteration 1)", rows, args.output, extra)


if __name__ == "__main__":
    main()
