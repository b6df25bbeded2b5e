from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from selfreward.backends import open_backend
from selfreward.recipe import BackendSection
from selfreward.run.jsonl import read_jsonl
from tests.conftest import ScriptedJudge


class Opener:
    """Opens the tiny model behind the scripted judge, whatever model the command names; records the names."""

    def __init__(self, tiny_model: str) -> None:
        self.tiny_model, self.calls = tiny_model, []

    def __call__(self, model, endpoint, api, backend, concurrency, timeout):
        self.calls.append(model)
        return ScriptedJudge(open_backend(self.tiny_model, BackendSection(kind="transformers", dtype="float32")))


@pytest.fixture()
def opened(tiny_model) -> Opener:
    return Opener(tiny_model)


def invoke(opened: Opener, *args: str):
    from selfreward.cli import app

    return CliRunner().invoke(app, list(args), obj={"open_judge_backend": opened})


def write_items(path, count):
    path.write_text("".join(json.dumps({"id": i, "instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(count)))


def test_judge_file_mode_scores_every_item_and_resumes_by_id(tmp_path, opened):

    items, out = tmp_path / "items.jsonl", tmp_path / "scored.jsonl"
    write_items(items, 5)
    # The first unit (4 items: the scripted backend's 8 prompts / k=2) finished before an interruption.
    out.write_text("".join(json.dumps({"id": i, "score": 2.0, "scores": [2], "judgments": ["Score: 2"], "parse_failures": 0}) + "\n"
                           for i in range(4)))
    result = invoke(opened, "judge", "-i", str(items), "-o", str(out), "-m", "tiny", "-k", "2")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["scores"] for r in records[:4]] == [[2]] * 4  # kept, not redone
    assert len(records[4]["scores"]) == 2 and records[4]["score"] is not None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1, "instruction": "q", "response": "a"}\n{"id": 2, "instruction": "q"}\n', "items.jsonl:2: missing field 'response'"),
        ('{"id": 1, "instruction": "q", "response": "a"}\n{"id": 1, "instruction": "q", "response": "b"}\n', "items.jsonl:2: duplicate id '1'"),
        ('{"instruction": "q", "response": "a"}\n', "items.jsonl:1: field 'id' must be"),
        ("", "no items to judge"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(tmp_path, opened, content, message):

    items = tmp_path / "items.jsonl"
    items.write_text(content)
    result = invoke(opened, "judge", "-i", str(items), "-o", str(tmp_path / "out.jsonl"), "-m", "tiny")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert opened.calls == [] and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", [["judge", "-i"], ["judge-eval", "--ranked"]])
@pytest.mark.parametrize("top_p", ["0", "1.5"])
def test_a_top_p_outside_0_1_is_refused_before_any_model_is_loaded(tmp_path, opened, command, top_p):
    # Top-p 0 would keep no token: vLLM refuses it, and a sampler handed it has nothing to draw from.
    items = tmp_path / "items.jsonl"
    write_items(items, 2)
    result = invoke(opened, *command, str(items), "-m", "tiny", "--top-p", top_p)
    assert result.exit_code == 2 and "not in (0, 1]" in result.output and "Traceback" not in result.output
    assert opened.calls == []
