"""The real embedded model (Gemma 3 270M base) through the whole loop with a minimal recipe."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.jsonl import read_jsonl
from selfreward.rundir import RunDir

pytestmark = pytest.mark.slow

RECIPE = {
    "seed": 0, "iterations": 1,
    "model": {"base": "embedded:gemma3-270m"},
    "backend": {"kind": "transformers", "dtype": "bfloat16", "batch_size": 48},
    "data": {"ift": "data/ift.jsonl", "eft": "data/eft.jsonl", "max_ift": 8, "max_eft": 16},
    "sft": {"epochs": 1, "learning_rate": 1e-4, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 512},
    "prompts": {"count": 4, "max_new_tokens": 40},
    "responses": {"n": 4, "max_new_tokens": 48},
    "judge": {"samples": 2, "max_new_tokens": 64},
    "dpo": {"learning_rate": 2e-5, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 256,
            "lora": {"enabled": True, "r": 8, "alpha": 16}},
}


def test_real_model_runs_the_loop_and_resumes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["iterate", "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    run = RunDir(out)
    judgments = read_jsonl(run.judgments(1))
    assert len(read_jsonl(run.prompts(1))) == 4 and len(judgments) == 16
    # After SFT on EFT data the model writes parseable judgments at least some of the time.
    assert sum(len(j["scores"]) - j["parse_failures"] for j in judgments) > 0
    assert (run.model(1) / "model.safetensors").is_file()
    assert "mean score" in result.output  # the summary table
    stamps = {path: path.stat().st_mtime_ns for path in (out / "done").rglob("*.json")}
    again = CliRunner().invoke(app, ["iterate", "-r", str(recipe), "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert {path: path.stat().st_mtime_ns for path in (out / "done").rglob("*.json")} == stamps  # nothing redone
