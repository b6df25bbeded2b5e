"""Over-long instructions and responses are cut to the recipe's limits, and the cuts are counted."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from selfreward import loop
from selfreward.backends.base import Backend, Completion
from selfreward.data.limits import truncate_text
from selfreward.data.seeds import load_ift, load_seeds, subsample
from selfreward.recipe import DataSection, LimitsSection, parse_recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from selfreward.stages import BY_NAME, sft
from selfreward.stages.context import Models, StageContext
from tests.test_pipeline import tiny_recipe


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("short", 5, "short"),
    ("hello world again", 13, "hello world"),   # the limit falls inside 'again': the word goes
    ("hello world again", 11, "hello world"),   # the limit falls on a space
    ("x" * 50, 10, "x" * 10),                   # no whitespace near the limit: cut where it stands
    ("a " + "y" * 40, 20, "a " + "y" * 18),     # whitespace too far back to move to
])
def test_cut_keeps_within_the_limit_and_avoids_splitting_words(text, limit, expected):
    assert truncate_text(text, limit) == expected


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_seed_loading_cuts_long_instructions_and_responses_and_counts_them(tmp_path, caplog):
    long_instruction, long_response = "Please " * 10, "Words and more words. " * 5
    ift = write_jsonl(tmp_path / "ift.jsonl", [
        {"id": "a", "instruction": long_instruction, "response": "ok"},
        {"id": "b", "instruction": "q", "response": long_response},
        {"id": "c", "instruction": "q", "response": "fine"},
    ])
    judgment = "Long but on topic.\nScore: 3"
    eft = write_jsonl(tmp_path / "eft.jsonl", [
        {"id": "e", "instruction": "q", "response": long_response, "judgment": judgment, "score": 3},
    ])
    limits = LimitsSection(max_instruction_chars=30, max_response_chars=40)
    with caplog.at_level(logging.WARNING):
        ift_records, eft_records, truncated = load_seeds(DataSection(ift=ift, eft=eft), 0, limits)
    assert truncated == {"ift_instructions": 1, "ift_responses": 1, "eft_instructions": 0, "eft_responses": 1}
    by_id = {r["id"]: r for r in ift_records}
    assert by_id["a"]["instruction"] == "Please Please Please Please"
    assert by_id["b"]["response"] == "Words and more words. Words and more"
    assert by_id["c"]["response"] == "fine"
    assert eft_records[0]["response"] == by_id["b"]["response"] and eft_records[0]["judgment"] == judgment
    assert "truncated 1 of 3 IFT instructions to 30 characters" in caplog.messages
    assert "truncated 1 of 1 EFT responses to 40 characters" in caplog.messages


def test_sft_stage_records_the_seed_cuts_in_its_done_record(tmp_path):
    trained_on = {}

    def fake_sft(model, ift, eft, template, config, output, seed, trust_remote_code, log_path):
        trained_on.update(ift=ift, eft=eft)
        return {"steps": 0}

    recipe = parse_recipe(tiny_recipe("base", limits={"max_response_chars": 100}), "tiny")
    run = RunDir(tmp_path / "run")
    truncated = sft.train(StageContext(recipe, run, 0, "sft", Models(recipe)), fake_sft, resolve=lambda ref: ref)["truncated"]
    originals = subsample(load_ift("data/ift.jsonl"), 8, 0)  # the recipe's max_ift and seed
    assert truncated["ift_responses"] == sum(len(r["response"]) > 100 for r in originals) > 0
    assert truncated["ift_instructions"] == 0
    assert [r["id"] for r in trained_on["ift"]] == [r["id"] for r in originals]
    assert all(len(r["response"]) <= 100 for r in trained_on["ift"] + trained_on["eft"])


class Recording(Backend):
    """Answers every judge prompt with `Score: 3` and keeps the prompts it was given."""

    chunk_prompts = 8

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompts, n, sampling):
        self.prompts += prompts
        return [[Completion("ok\nScore: 3", 3, True)] * n for _ in prompts]

    def next_token_probs(self, prompts, token_ids):
        raise NotImplementedError


@pytest.fixture()
def recording(tiny_model):
    from selfreward.models import load_tokenizer

    return Recording(load_tokenizer(tiny_model))


def test_judging_stage_judges_cut_responses_and_counts_them(tmp_path, recording):
    long = "step " * 30
    recipe = parse_recipe(tiny_recipe("base", sft={"enabled": False}, judge={"samples": 1},
                                      limits={"max_instruction_chars": 50, "max_response_chars": 24}), "tiny")
    run = RunDir(tmp_path / "run")
    run.iteration(1).mkdir(parents=True)
    write_jsonl(run.responses(1), [{"id": f"r{i}", "prompt_id": "p", "instruction": "q", "response": text,
                                    "tokens": 1, "finished": True} for i, text in enumerate([long, "short answer"])])
    run.mark_done("iter1/prompts", {})
    run.mark_done("iter1/generate", {})
    result = loop.run_stage(BY_NAME["judge"], recipe, run, 1, Models(recipe, lambda *args: recording))
    assert result["truncated"] == {"instructions": 0, "responses": 1}
    assert "step step step step" in recording.prompts[0] and long.strip() not in recording.prompts[0]
    assert [r["id"] for r in read_jsonl(run.judgments(1))] == ["r0", "r1"]


def test_judge_file_mode_cuts_long_responses_and_reports_the_count(tmp_path, recording):
    from selfreward.cli import app

    items = write_jsonl(tmp_path / "items.jsonl", [
        {"id": 1, "instruction": "q", "response": "a long answer that goes on"},
        {"id": 2, "instruction": "q", "response": "brief"},
    ])
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(app, ["judge", "-i", items, "-o", str(out), "-m", "x", "-k", "1", "--max-response-chars", "13"],
                                obj={"open_judge_backend": lambda *args: recording})
    assert result.exit_code == 0, result.output
    assert "truncated 1 of 2 judged responses to 13 characters" in result.output
    assert "a long answer" in recording.prompts[0] and "that goes" not in recording.prompts[0]
    assert [r["id"] for r in read_jsonl(out)] == [1, 2]
