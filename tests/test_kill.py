"""Fault injection: SIGKILL the loop at 20+ points spread over every stage (training included), each
followed by a rerun, and check that the run ends with exactly the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from selfreward.recipe import load_recipe
from selfreward.run.directory import RunDir
from selfreward.stages import STAGES
from tests.conftest import ROOT
from tests.test_pipeline import tiny_recipe

pytestmark = pytest.mark.slow
RUNNER = [sys.executable, str(ROOT / "tests" / "crash_runner.py"), "iterate"]
ITERATIONS = 2
# Wall-clock fields differ between any two runs; everything else must match.
TIMING = {"seconds", "judged_now"}


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def checkpoint(work: Path, step: int, complete: bool) -> bool:
    """A trainer checkpoint of at least `step` exists (complete: its trainer state is written, which is last)."""
    for folder in work.glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) >= step and (not complete or (folder / "trainer_state.json").exists()):
            return True
    return False


def pairs_being_written(run: RunDir, t: int) -> bool:
    return any(run.iteration(t).glob(".pairs.jsonl.*.tmp")) or run.pairs(t).exists() and not run.is_done(f"iter{t}/pairs")


@dataclass(frozen=True)
class KillPoint:
    """Kill the run once `ready(run)` holds: a moment inside the stage `stage`, recognised by its progress on
    disk. If the run gets past that stage first (a window of milliseconds missed), it is killed at once, so
    that it never runs on past the points that follow."""

    name: str
    stage: str
    ready: Callable[[RunDir], bool]


def kill_points() -> list[KillPoint]:
    points = [
        KillPoint("sft: started", "sft", lambda run: (run.root / "locks" / "sft.lock").exists()),
        KillPoint("sft: first checkpoint being written", "sft", lambda run: checkpoint(run.root / ".m1.work", 1, False)),
        KillPoint("sft: checkpoint 2 complete", "sft", lambda run: checkpoint(run.root / ".m1.work", 2, True)),
    ]
    for t in range(1, ITERATIONS + 1):
        points += [
            KillPoint(f"iter{t} prompts: first round", f"iter{t}/prompts", lambda run, t=t: lines(run.iteration(t) / "prompts.rounds.jsonl") >= 1),
            KillPoint(f"iter{t} prompts: second round", f"iter{t}/prompts", lambda run, t=t: lines(run.iteration(t) / "prompts.rounds.jsonl") >= 2),
            KillPoint(f"iter{t} generate: first unit", f"iter{t}/generate", lambda run, t=t: lines(run.responses(t)) >= 6),
            KillPoint(f"iter{t} generate: half", f"iter{t}/generate", lambda run, t=t: lines(run.responses(t)) >= 12),
            KillPoint(f"iter{t} judge: first unit", f"iter{t}/judge", lambda run, t=t: lines(run.judgments(t)) >= 4),
            KillPoint(f"iter{t} judge: half", f"iter{t}/judge", lambda run, t=t: lines(run.judgments(t)) >= 12),
            KillPoint(f"iter{t} pairs: judge just done", f"iter{t}/pairs", lambda run, t=t: run.is_done(f"iter{t}/judge")),
            # The pair stage is one atomic write: its window is the temporary file's write and fsync.
            KillPoint(f"iter{t} pairs: file being written", f"iter{t}/pairs", lambda run, t=t: pairs_being_written(run, t)),
            KillPoint(f"iter{t} dpo: pairs just done", f"iter{t}/dpo", lambda run, t=t: run.is_done(f"iter{t}/pairs")),
            KillPoint(f"iter{t} dpo: first checkpoint", f"iter{t}/dpo", lambda run, t=t: checkpoint(run.iteration(t) / ".model.work", 1, True)),
            KillPoint(f"iter{t} dpo: second checkpoint being written", f"iter{t}/dpo", lambda run, t=t: checkpoint(run.iteration(t) / ".model.work", 2, False)),
        ]
    return points


def start(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(RUNNER + ["-r", str(recipe), "-o", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def running_stage(run: RunDir) -> str:
    """The stage the loop was in: the first one, in loop order, that the recipe runs and has no done record."""
    recipe = load_recipe(run.recipe_path)
    for t in range(0, ITERATIONS + 1):
        for stage in STAGES:
            if stage.per_iteration == (t > 0) and stage.enabled(recipe) and not run.is_done(stage.done_key(t)):
                return stage.done_key(t)
    return "finished"


def kill_at(recipe: Path, run: RunDir, point: KillPoint) -> str | None:
    """Run until `point` is reached, then SIGKILL; the stage hit, or None if the run got past it first."""
    process = start(recipe, run.root)
    while not (point.ready(run) or run.is_done(point.stage)):
        if process.poll() is not None:
            assert process.returncode == 0, f"the run failed on its own before '{point.name}': {process.stderr.read()}"
            return None
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return running_stage(run)


def comparable(root: Path) -> dict[str, object]:
    """Every run file, record by record (JSONL, JSON), wall-time fields aside; model weights as tensors."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        text = path.read_text().replace(str(root), "<run>") if path.suffix in (".json", ".jsonl") else ""
        if path.suffix == ".jsonl":
            found[name] = [json.loads(line) for line in text.splitlines()]
        elif path.suffix == ".json":
            found[name] = _without_timing(json.loads(text))
        elif path.suffix == ".safetensors":
            found[name] = load_file(str(path))
    return found


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING and not k.startswith("train_runtime")
                and not k.endswith(("_per_second",))}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_sigkill_at_twenty_points_over_every_stage_ends_with_the_records_of_an_uninterrupted_run(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    training = {"batch_size": 2, "save_steps": 1, "save_minutes": None}
    raw = tiny_recipe(tiny_model, iterations=ITERATIONS, prompts={"count": 8, "round_size": 3}, sft=training, dpo=training)
    recipe.write_text(yaml.safe_dump(raw))
    clean = RunDir(tmp_path / "clean")
    process = start(recipe, clean.root)
    assert process.wait(timeout=900) == 0, process.stderr.read()

    killed = RunDir(tmp_path / "killed")
    hits = {}
    for point in kill_points():
        stage = kill_at(recipe, killed, point)
        if stage not in (None, "finished"):
            hits[point.name] = stage
    process = start(recipe, killed.root)
    assert process.wait(timeout=900) == 0, process.stderr.read()

    report = "\n".join(f"{point:45s} → {stage}" for point, stage in hits.items())
    print(f"\n{len(hits)} kills:\n{report}\nper stage: {dict(Counter(s.split('/')[-1] for s in hits.values()))}")
    assert len(hits) >= 20, report
    assert {s.split("/")[-1] for s in hits.values()} >= {"sft", "prompts", "generate", "judge", "pairs", "dpo"}, report
    expected, actual = comparable(clean.root), comparable(killed.root)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if name.endswith(".safetensors"):
            for key, tensor in value.items():
                torch.testing.assert_close(actual[name][key], tensor, rtol=0, atol=0, msg=f"{name}: {key}")
        else:
            assert actual[name] == value, name
