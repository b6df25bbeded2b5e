"""The real embedded model (Gemma 3 270M base) through the whole loop with a minimal recipe,
killed (SIGKILL) in the middle of judging and resumed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RECIPE = {
    "seed": 0, "iterations": 1,
    "model": {"base": "embedded:gemma3-270m"},
    "backend": {"kind": "transformers", "batch_size": 16},
    "data": {"ift": "data/ift.jsonl", "eft": "data/eft.jsonl", "max_ift": 8, "max_eft": 16},
    "sft": {"epochs": 1, "learning_rate": 2e-4, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 512,
            "lora": {"enabled": True, "r": 16, "alpha": 32}},
    "prompts": {"model": "embedded:gemma3-270m", "count": 4, "max_new_tokens": 40},
    "responses": {"n": 4, "max_new_tokens": 48},
    # Room for the score line: a judgment cut before it is unscored, and a prompt needs two scored, unequal
    # responses to give DPO a pair. Generation stops at `Score: N`, so the room costs little.
    "judge": {"samples": 3, "max_new_tokens": 128, "unit_size": 8},  # two units: a kill can fall between them
    "dpo": {"learning_rate": 2e-5, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 256,
            "lora": {"enabled": True, "r": 8, "alpha": 16}},
}


def iterate(recipe, out):
    return subprocess.Popen([sys.executable, "-m", "selfreward", "iterate", "-r", str(recipe), "-o", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_real_model_runs_the_loop_survives_a_kill_and_resumes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    run = RunDir(out)
    process = iterate(recipe, out)
    deadline = time.time() + 1500
    while not (run.judgments(1).exists() and run.judgments(1).stat().st_size > 0):  # first chunk on disk
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_jsonl(run.judgments(1))
    assert 0 < len(partial) < 16 and not run.is_done("iter1/judge")

    process = iterate(recipe, out)
    output, _ = process.communicate(timeout=1500)
    assert process.returncode == 0, output
    responses = read_jsonl(run.responses(1))
    judgments = read_jsonl(run.judgments(1))
    assert len(read_jsonl(run.prompts(1))) == 4 and Counter(r["prompt_id"] for r in responses) == Counter({p: 4 for p in {r["prompt_id"] for r in responses}})
    assert sorted(j["id"] for j in judgments) == sorted(r["id"] for r in responses)  # none lost, none twice
    assert [j["id"] for j in judgments[: len(partial)]] == [j["id"] for j in partial]  # kept, not redone
    # After SFT on EFT data the model writes parseable judgments at least some of the time.
    assert sum(len(j["scores"]) - j["parse_failures"] for j in judgments) > 0
    assert (run.model(1) / "model.safetensors").is_file()
    assert "mean score" in output  # the summary table

    stamps = {path: path.stat().st_mtime_ns for path in (out / "done").rglob("*.json")}
    process = iterate(recipe, out)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert {path: path.stat().st_mtime_ns for path in (out / "done").rglob("*.json")} == stamps  # nothing redone
    assert "backend" not in output  # no model was even loaded
