"""The bad-input corpus: every case through the real CLI must end in one `error:` line that names the
file, key or line, exit code 2, no traceback, and no run directory (no work started)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.run.directory import RunDir
from tests.conftest import ROOT

SEEDS = f"data:\n  ift: {ROOT / 'data' / 'ift.jsonl'}\n  eft: {ROOT / 'data' / 'eft.jsonl'}\n"

# (case id, recipe text appended to valid seed paths, fragment the error line must contain)
RECIPES = [
    ("unknown-top-key", "iteratons: 2\n", "iteratons: unknown key"),
    ("unknown-nested-key", "dpo:\n  betta: 0.1\n", "dpo.betta: unknown key"),
    ("wrong-type", "iterations: two\n", "iterations:"),
    ("wrong-type-section", "judge: 3\n", "judge:"),
    ("n-below-2", "responses:\n  n: 1\n", "responses.n:"),
    ("k-below-1", "judge:\n  samples: 0\n", "judge.samples:"),
    ("negative-temperature", "responses:\n  temperature: -0.5\n", "responses.temperature:"),
    ("negative-prompt-temperature", "prompts:\n  temperature: -1\n", "prompts.temperature:"),
    ("beta-zero", "dpo:\n  beta: 0\n", "dpo.beta:"),
    ("beta-negative", "dpo:\n  beta: -0.1\n", "dpo.beta:"),
    ("top-p-above-1", "responses:\n  top_p: 1.5\n", "responses.top_p:"),
    ("learning-rate-zero", "sft:\n  learning_rate: 0\n", "sft.learning_rate:"),
    ("negative-iterations", "iterations: -1\n", "iterations:"),
    ("unknown-backend", "backend:\n  kind: tpu\n", "backend.kind:"),
    ("zero-limit", "limits:\n  max_instruction_chars: 0\n", "limits.max_instruction_chars:"),
    ("min-above-max-chars", "prompts:\n  min_chars: 700\n", "prompts.max_chars must be greater"),
    ("missing-ift", "data:\n  ift: no/such/ift.jsonl\n", "data.ift: 'no/such/ift.jsonl' not found"),
    ("missing-judge-template", "judge:\n  template: no_such_template.txt\n", "judge.template: 'no_such_template.txt' not found"),
    ("missing-eval-file", "evaluation:\n  ranked: no/such/ranked.jsonl\n", "evaluation.ranked: 'no/such/ranked.jsonl' not found"),
    ("missing-oasst1-file", "data:\n  oasst1: no/such/oasst1.jsonl\n", "data.oasst1: 'no/such/oasst1.jsonl' not found"),
    ("missing-model-dir", "model:\n  base: ./no/such/model\n", "model.base: model './no/such/model': directory not found"),
    ("unknown-embedded-model", "model:\n  base: embedded:llama-9000\n", "model.base: model 'embedded:llama-9000': unknown embedded model"),
    ("missing-prompt-model", "prompts:\n  model: /no/such/model\n", "prompts.model: model '/no/such/model': directory not found"),
    ("yaml-syntax", "judge: [\n", ":"),
    ("not-a-mapping", None, "a recipe must be a mapping"),
]


def _run(tmp_path, *args):
    result = CliRunner().invoke(app, list(args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, lines


def _assert_one_line_error(result, lines, fragment, run_dir):
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not run_dir.exists()  # no work started, not even the run directory


@pytest.mark.parametrize(("case", "text", "fragment"), RECIPES, ids=[c[0] for c in RECIPES])
def test_bad_recipe_is_one_line_and_exit_2(tmp_path, case, text, fragment):
    recipe = tmp_path / f"{case}.yaml"
    if text is None:
        recipe.write_text("- just\n- a list\n")
    elif text.startswith("data:"):
        recipe.write_text(text)  # replaces the seed paths
    else:
        recipe.write_text(SEEDS + text)
    result, lines = _run(tmp_path, "iterate", "--recipe", str(recipe), "--output", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, f"{case}.yaml", tmp_path / "run")
    assert fragment in lines[0]


def test_recipe_that_is_not_utf8_or_missing(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result, lines = _run(tmp_path, "iterate", "-r", str(recipe), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, "latin1.yaml: not valid UTF-8", tmp_path / "run")
    result, lines = _run(tmp_path, "iterate", "-r", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, "nope.yaml: recipe file not found", tmp_path / "run")


@pytest.mark.parametrize("text", ["", "# nothing here yet\n\n"], ids=["empty", "comments-only"])
def test_empty_recipe_is_one_line_and_starts_no_run(tmp_path, text):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    result, lines = _run(tmp_path, "iterate", "-r", str(recipe), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, f"{recipe}: the recipe is empty (copy one from recipes/)", tmp_path / "run")


def test_model_directory_without_config_is_refused(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SEEDS + f"model:\n  base: {tmp_path / 'not_a_model'}\n")
    result, lines = _run(tmp_path, "iterate", "-r", str(recipe), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, "not a model directory (no config.json)", tmp_path / "run")


GOOD_IFT = {"id": "a", "instruction": "Say hi.", "response": "Hi."}
# (case id, file bytes, fragment): seed IFT files named by a recipe.
SEED_FILES = [
    ("not-json", b'{"id": "a", "instruction": "x", "response": "y"}\n{oops\n', "ift.jsonl:2: not valid JSON"),
    ("not-an-object", b"[1, 2]\n", "ift.jsonl:1: expected a JSON object, got list"),
    ("missing-field", json.dumps({"id": "a", "instruction": "x"}).encode() + b"\n", "ift.jsonl:1: missing field 'response'"),
    ("wrong-type", json.dumps({**GOOD_IFT, "instruction": 5}).encode() + b"\n", "ift.jsonl:1: field 'instruction' must be str, got int"),
    ("empty-instruction", json.dumps({**GOOD_IFT, "instruction": "  "}).encode() + b"\n", "ift.jsonl:1: field 'instruction' is empty"),
    ("non-utf8", json.dumps(GOOD_IFT).encode() + b"\n" + b'{"id": "b", "instruction": "caf\xe9"}\n', "ift.jsonl:2: not valid UTF-8"),
    ("duplicate-id", (json.dumps(GOOD_IFT) + "\n" + json.dumps(GOOD_IFT) + "\n").encode(), "ift.jsonl: duplicate id 'a'"),
    ("empty-file", b"", "ift.jsonl: empty file"),
    ("blank-lines-only", b"\n\n  \n", "ift.jsonl: empty file"),
    ("number-too-long", b'{"id": "a", "instruction": "x", "response": ' + b"9" * 5000 + b"}\n", "ift.jsonl:1: not valid JSON"),
    ("nested-too-deep", b'{"id": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "ift.jsonl:1: not valid JSON"),
]


@pytest.mark.parametrize(("case", "content", "fragment"), SEED_FILES, ids=[c[0] for c in SEED_FILES])
def test_bad_seed_file_is_one_line_naming_file_and_line(tmp_path, case, content, fragment):
    (tmp_path / "ift.jsonl").write_bytes(content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  ift: {tmp_path / 'ift.jsonl'}\n  eft: null\n")
    result, lines = _run(tmp_path, "iterate", "-r", str(recipe), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, fragment, tmp_path / "run")


def test_bad_eft_score_is_named(tmp_path):
    record = {**GOOD_IFT, "judgment": "Fine.\nScore: 3", "score": 4}
    (tmp_path / "eft.jsonl").write_text(json.dumps(record) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  ift: {ROOT / 'data' / 'ift.jsonl'}\n  eft: {tmp_path / 'eft.jsonl'}\n")
    result, lines = _run(tmp_path, "iterate", "-r", str(recipe), "-o", str(tmp_path / "run"))
    _assert_one_line_error(result, lines, "eft.jsonl: record 'a': judgment does not end in 'Score: 4'", tmp_path / "run")


def test_a_model_folder_without_weights_is_one_line_before_any_work(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a config, but no weights and no tokenizer
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sft": {"enabled": False}, "prompts": {"model": str(broken)}}))
    result, lines = _run(tmp_path, "prompts", "-r", str(recipe), "-o", str(tmp_path / "run"), "-t", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"prompts.model: model '{broken}': no weights (*.safetensors)" in " ".join(result.output.split())
    assert not RunDir(tmp_path / "run").is_done("iter1/prompts")
