"""`selfreward compare` against fake OpenAI-compatible judges (a local server, standard library) whose
preferences are known: position bias, one side always, the longer answer."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.judge.compare import lc_win_rate
from tests.conftest import send_json, serving

RESPONSE = re.compile(r"<response_(a|b)>\n(.*?)\n</response_\1>", re.S)


class Judge(BaseHTTPRequestHandler):
    """Answers each pairwise prompt with `Judge.policy(response_a, response_b)`: "A", "B" or any text."""

    policy = staticmethod(lambda a, b: "A")
    requests = 0

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests += 1
        prompt = body["messages"][-1]["content"]
        found = dict(RESPONSE.findall(prompt))
        verdict = Judge.policy(found["a"], found["b"])
        text = f"Both are fine.\nWinner: {verdict}" if verdict in ("A", "B") else verdict
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}] * body["n"]})

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    Judge.requests = 0
    with serving(Judge) as url:
        yield url


def answer_sets(tmp_path, n: int = 60, model_longer: int = 48):
    """Instructions, and two answer files: the model's answers ([M]) are the longer ones for `model_longer`
    of the `n` instructions."""
    instructions = [{"instruction": f"Question {i}: what is {i} squared?"} for i in range(n)]
    model, baseline = [], []
    for i, item in enumerate(instructions):
        long, short = 40 + (i * 7) % 50, 5 + (i * 3) % 20
        m, b = (long, short) if i < model_longer else (short, long)
        model.append({"instruction": item["instruction"], "output": "[M] " + "word " * m})
        baseline.append({"instruction": item["instruction"], "output": "[B] " + "word " * b})
    paths = {}
    for name, records in (("instructions", instructions), ("model", model), ("baseline", baseline)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    return paths


def run_compare(paths, endpoint, output):
    result = CliRunner().invoke(app, [
        "compare", "--instructions", str(paths["instructions"]), "--model", str(paths["model"]),
        "--baseline", str(paths["baseline"]), "--output", str(output), "--judge-model", "fake-judge", "--endpoint", endpoint,
    ])
    assert result.exit_code == 0, result.output
    return json.loads(output.read_text())["summary"], result.output


def letter_of(side: str):
    return lambda a, b: "A" if a.startswith(side) else "B"


def longer(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B"


def test_a_judge_that_always_answers_a_gives_fifty_and_no_position_consistency(tmp_path, endpoint):
    Judge.policy = staticmethod(lambda a, b: "A")
    summary, _ = run_compare(answer_sets(tmp_path), endpoint, tmp_path / "out.json")
    assert summary["n"] == 60 and summary["ties"] == 60
    assert summary["win_rate"] == 50.0 and summary["position_consistency"] == 0.0
    assert Judge.requests == 120  # two judge calls per item, no more


def test_a_judge_that_always_prefers_the_model_side_gives_a_hundred(tmp_path, endpoint):
    Judge.policy = staticmethod(letter_of("[M]"))
    summary, printed = run_compare(answer_sets(tmp_path), endpoint, tmp_path / "out.json")
    assert summary["win_rate"] == 100.0 and summary["wins"] == 60 and summary["position_consistency"] == 100.0
    assert summary["lc_win_rate"] > 80  # no length effect to take away: it stays high
    assert "win rate" in printed


def test_length_control_takes_away_a_length_judges_preference_but_not_a_real_one(tmp_path, endpoint):
    paths = answer_sets(tmp_path)
    Judge.policy = staticmethod(longer)
    by_length, _ = run_compare(paths, endpoint, tmp_path / "length.json")
    assert by_length["win_rate"] == 80.0  # the model side is longer for 48 of 60 items
    assert 35 <= by_length["lc_win_rate"] <= 65
    Judge.policy = staticmethod(letter_of("[M]"))
    real, _ = run_compare(paths, endpoint, tmp_path / "real.json")
    assert real["win_rate"] == 100.0 and real["lc_win_rate"] > 80


def test_a_rerun_prints_the_same_numbers_and_judges_nothing_again(tmp_path, endpoint):
    paths = answer_sets(tmp_path, n=20, model_longer=12)
    Judge.policy = staticmethod(lambda a, b: "A" if hash((a, b)) % 3 else "B")
    first, _ = run_compare(paths, endpoint, tmp_path / "out.json")
    requests = Judge.requests
    (tmp_path / "out.json").unlink()  # the summary is gone; the verdicts beside it remain
    second, _ = run_compare(paths, endpoint, tmp_path / "out.json")
    assert second == first and Judge.requests == requests


def test_an_order_without_a_verdict_is_asked_once_more_then_left_out(tmp_path, endpoint):
    paths = answer_sets(tmp_path, n=4)
    model = json.loads(paths["model"].read_text())
    model[0]["output"] = "[M] a hard case"
    paths["model"].write_text(json.dumps(model))
    asked: dict[tuple[str, str], int] = {}

    def stubborn(a: str, b: str) -> str:  # every order answers the second time, but item 0's first order never
        asked[(a, b)] = asked.get((a, b), 0) + 1
        if "hard case" in a:
            return "no idea"
        return "A" if asked[(a, b)] > 1 else "I cannot decide."

    Judge.policy = staticmethod(stubborn)
    summary, _ = run_compare(paths, endpoint, tmp_path / "out.json")
    assert Judge.requests == 16 and set(asked.values()) == {2}  # 8 orders, each asked twice, none a third time
    assert summary["unparsed"] == 1 and summary["n"] == 3 and summary["ties"] == 3  # "A" in both orders: a tie


def test_bad_input_is_one_line_and_exit_2(tmp_path, endpoint):
    paths = answer_sets(tmp_path, n=3)
    paths["baseline"].write_text(json.dumps([{"instruction": "another question", "output": "x"}]))
    result = CliRunner().invoke(app, [
        "compare", "--instructions", str(paths["instructions"]), "--model", str(paths["model"]),
        "--baseline", str(paths["baseline"]), "--output", str(tmp_path / "out.json"), "--judge-model", "j", "--endpoint", endpoint,
    ])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "baseline.json: no answer for 3 of 3 instructions" in lines[0]


def test_lc_win_rate_is_finite_for_a_perfectly_separating_judge():
    assert 95 < lc_win_rate([1.0] * 50, [100] * 50, [10] * 50) < 100
    assert lc_win_rate([0.5] * 10, list(range(10)), [5] * 10) == pytest.approx(50.0)


def test_the_loop_compares_each_new_model_with_the_one_before_by_a_fixed_judge(tiny_model, tmp_path, endpoint):
    from selfreward import loop
    from selfreward.recipe import parse_recipe
    from selfreward.run.directory import RunDir
    from tests.test_pipeline import Scripted, tiny_recipe

    instructions = tmp_path / "held_out.jsonl"
    seen = json.loads((Path("data/ift.jsonl").read_text().splitlines()[0]))["instruction"]
    instructions.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in [seen] + [f"Name {i} colours." for i in range(5)]))
    Judge.policy = staticmethod(lambda a, b: "A")
    recipe = parse_recipe(tiny_recipe(tiny_model, evaluation={"head_to_head": {
        "instructions": str(instructions), "judge": "fake-judge", "endpoint": endpoint, "answer_tokens": 8}}), "tiny")
    run = RunDir(tmp_path / "run")
    rows = loop.run(recipe, run, Scripted())
    for t, row in enumerate(rows, start=1):
        result = json.loads(run.head_to_head(t).read_text())
        assert result["summary"]["n"] == 5 and run.done_record(f"iter{t}/head-to-head")["dropped_seen_in_seeds"] == 1
        assert result["model"] == str(run.model(t)) and result["baseline"] == (str(run.sft_model) if t == 1 else str(run.model(1)))
        assert row["head_to_head_win_rate"] == 50.0 and row["head_to_head_ci"].endswith("n=5")  # an "A"-only judge: all ties
    # M2's answers of iteration 1 are iteration 2's baseline: not generated again.
    assert not (run.iteration(2) / "head_to_head.json.baseline_outputs.json").exists()
    assert Judge.requests == 2 * 5 * 2  # two orders per item, two iterations
    from selfreward.loop.evidence import write_report

    _, markdown = write_report(recipe, run)
    ci = json.loads(run.head_to_head(1).read_text())["summary"]["win_rate_ci"]
    assert f"| M_{{t+1}} vs M_t win rate % [95 % CI], n | 50.00 [{ci[0]:.2f}, {ci[1]:.2f}], n=5 |" in markdown.read_text()
