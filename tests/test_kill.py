"""Fault injection: SIGKILL the loop at random moments, rerun, and check nothing is lost or duplicated."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from selfreward.jsonl import read_jsonl
from selfreward.rundir import RunDir
from tests.conftest import ROOT
from tests.test_pipeline import tiny_recipe

pytestmark = pytest.mark.slow
RUNNER = [sys.executable, str(ROOT / "tests" / "crash_runner.py"), "iterate"]


def run_cli(recipe: Path, out: Path, kill_after: float | None) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(RUNNER + ["-r", str(recipe), "-o", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is None:
        return process.wait(timeout=600)
    try:
        return process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return -9


def check_complete(run: RunDir, iterations: int, prompts: int, n: int) -> None:
    for t in range(1, iterations + 1):
        prompt_ids = [p["id"] for p in read_jsonl(run.prompts(t))]
        assert len(prompt_ids) == prompts == len(set(prompt_ids))
        responses = read_jsonl(run.responses(t))
        assert Counter(r["prompt_id"] for r in responses) == {p: n for p in prompt_ids}
        assert len({r["id"] for r in responses}) == len(responses)
        judgments = read_jsonl(run.judgments(t))
        assert sorted(j["id"] for j in judgments) == sorted(r["id"] for r in responses)
        pairs = read_jsonl(run.pairs(t))
        assert len({p["id"] for p in pairs}) == len(pairs) and set(p["id"] for p in pairs) <= set(prompt_ids)
        assert (run.model(t) / "model.safetensors").is_file()
        for stage in ("prompts", "responses", "judgments", "pairs", "dpo"):
            assert run.is_done(f"iter{t}/{stage}")


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(tiny_model, iterations=2)
    raw["prompts"]["count"] = 8
    raw["backend"]["batch_size"] = 6  # small chunks: many appends to interrupt
    recipe.write_text(yaml.safe_dump(raw))
    # An uninterrupted run measures how long the whole thing takes.
    started = time.perf_counter()
    assert run_cli(recipe, tmp_path / "clean", None) == 0
    total = time.perf_counter() - started
    check_complete(RunDir(tmp_path / "clean"), 2, 8, 3)

    rng = random.Random(1234)
    kills = attempts = 0
    directories = 0
    while kills < 20:
        out = tmp_path / f"killed{directories}"
        directories += 1
        # Kill at a random moment, rerun, again and again, until a run gets to the end.
        while (code := run_cli(recipe, out, rng.uniform(1.0, total))) != 0:
            assert code == -9, f"the run failed on its own (exit code {code})"
            kills += 1
            attempts += 1
            assert attempts < 80, "the run never completes between kills"
            run = RunDir(out)
            for t in (1, 2):  # a stage marked done has all its outputs, even right after a kill
                if run.is_done(f"iter{t}/responses"):
                    assert len(read_jsonl(run.responses(t))) == 8 * 3
                if run.is_done(f"iter{t}/judgments"):
                    assert len(read_jsonl(run.judgments(t))) == 8 * 3
        check_complete(RunDir(out), 2, 8, 3)
