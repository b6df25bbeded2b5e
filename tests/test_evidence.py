"""The run report: every figure it shows is read from the run's files."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from selfreward import loop
from selfreward.loop.evidence import figures, markdown, wilson, write_report
from selfreward.recipe import parse_recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from tests.conftest import needs
from tests.test_pipeline import tiny_recipe


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    from tests.test_pipeline import Scripted

    folder = tmp_path_factory.mktemp("report")
    pairs = folder / "human.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A careful answer to question {i}.",
                                         "rejected": "No."}) + "\n" for i in range(6)))
    recipe = parse_recipe(tiny_recipe(tiny_model, evaluation={"pairs": str(pairs), "policy": True, "limit": 6}), "tiny")
    run = RunDir(folder / "run")
    loop.run(recipe, run, Scripted())
    return recipe, run


def test_the_report_shows_the_runs_own_figures(finished_run):
    recipe, run = finished_run
    html_path, md_path = write_report(recipe, run)
    data, text = figures(recipe, run), md_path.read_text()
    for t, row in enumerate(data["iterations"], start=1):
        metrics = json.loads(run.metrics(t).read_text())
        assert row["metrics"] == metrics
        responses = read_jsonl(run.responses(t))
        assert row["responses"] == len(responses) == metrics["responses"]
        assert row["cut_at_max_tokens"] == sum(not r["finished"] for r in responses) == metrics["responses_cut"]
        assert sum(row["score_counts"]) == sum(len(j["scores"]) - j["parse_failures"] for j in read_jsonl(run.judgments(t)))
        policy = json.loads(run.policy_eval(t).read_text())
        assert row["policy_agreement"]["accuracy"] == policy["accuracy"]
        assert f"{policy['accuracy']:.2f} [{policy['accuracy_ci'][0]:.2f}, {policy['accuracy_ci'][1]:.2f}], n=6" in text
        judge = json.loads(run.judge_eval(t).read_text())["pairs"]
        assert row["judge_agreement"]["pairs"]["judge"] == judge["judge"]["pairwise_accuracy"]
        assert all(metrics["seconds"][stage] is not None for stage in ("evaluate", "policy"))  # every stage's time
        assert [r["loss"] for r in row["dpo_log"]] == [r["loss"] for r in read_jsonl(run.dpo_log(t))]
    counts = [json.loads(run.metrics(t).read_text())["pairs"] for t in (1, 2)]
    assert f"| pairs | {counts[0]} | {counts[1]} |" in text.splitlines()
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 5 and "http://" not in page and "https://" not in page and "<script" not in page
    assert markdown(data) == text


def test_wilson_interval():
    assert wilson(50.0, 100) == [40.38, 59.62]
    assert wilson(None, 10) is None and wilson(50.0, 0) is None


@pytest.mark.slow
def test_the_report_renders_in_a_browser_without_console_errors(finished_run, tmp_path):
    browser = shutil.which("chromium")
    needs(browser is not None, "Debian's chromium (.ci/run installs it)")
    recipe, run = finished_run
    html_path, _ = write_report(recipe, run)
    shot = tmp_path / "report.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--window-size=1280,4000", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                           html_path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if ":CONSOLE" in line], done.stderr[-2000:]


def test_each_iteration_reuses_the_log_probabilities_its_reference_had_as_the_policy_before(finished_run):
    _, run = finished_run
    first, second = (json.loads(run.policy_eval(t).read_text()) for t in (1, 2))
    assert second["reference"] == str(run.model(1)) and second["logprobs"]["reference"] == first["logprobs"]["model"]
