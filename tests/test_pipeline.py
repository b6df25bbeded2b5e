"""The whole loop on a tiny random model, with a scripted judge (a random model cannot write `Score: N`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from selfreward import loop
from selfreward.backends import open_backend as real_open_backend
from selfreward.recipe import parse_recipe
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from selfreward.stages import BY_NAME
from selfreward.stages.context import Models
from tests.conftest import ScriptedJudge


def tiny_recipe(model: str, **changes) -> dict:
    recipe = {
        "seed": 0, "iterations": 2,
        "model": {"base": model},
        "backend": {"kind": "transformers", "dtype": "float32", "batch_size": 16},
        "data": {"ift": "data/ift.jsonl", "eft": "data/eft.jsonl", "max_ift": 8, "max_eft": 4},
        "sft": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 256, "precision": "fp32"},
        "prompts": {"count": 6, "shots": 3, "max_new_tokens": 24, "min_chars": 1, "max_chars": 400, "drop_unfinished": False,
                    "near_duplicate_threshold": 0.95, "round_size": 8},
        "responses": {"n": 3, "max_new_tokens": 12, "unit_size": 2},
        "judge": {"samples": 2, "max_new_tokens": 8, "unit_size": 4},
        "dpo": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 128, "precision": "fp32",
                "lora": {"enabled": True, "r": 4, "alpha": 8}},
    }
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


class Scripted:
    """A backend opener that wraps every model in the scripted judge and records what it loaded."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    def __call__(self, path, config, seed=0, trust_remote_code=False):
        self.loads.append(path)
        return ScriptedJudge(real_open_backend(path, config, seed, trust_remote_code))


@pytest.fixture()
def scripted() -> Scripted:
    return Scripted()


def test_full_loop_writes_every_stage_and_resumes_instantly(tiny_model, tmp_path, scripted):
    recipe = parse_recipe(tiny_recipe(tiny_model), "tiny")
    run = RunDir(tmp_path / "run")
    rows = loop.run(recipe, run, scripted)
    assert [row["iteration"] for row in rows] == [1, 2]
    for t in (1, 2):
        prompts = read_jsonl(run.prompts(t))
        responses = read_jsonl(run.responses(t))
        judgments = read_jsonl(run.judgments(t))
        pairs = read_jsonl(run.pairs(t))
        assert len(prompts) == 6 and len({p["id"] for p in prompts}) == 6
        assert Counter(r["prompt_id"] for r in responses) == {p["id"]: 3 for p in prompts}
        assert {j["id"] for j in judgments} == {r["id"] for r in responses}
        assert all(len(j["scores"]) == 2 for j in judgments)
        assert rows[t - 1]["pairs"] == len(pairs) > 0
        assert rows[t - 1]["pairs"] + rows[t - 1]["ties_dropped"] + rows[t - 1]["unscored_dropped"] == 6
        assert (run.model(t) / "model.safetensors").is_file()
        assert json.loads(run.metrics(t).read_text())["iteration"] == t
        assert rows[t - 1]["judged_text_truncated"] == {"instructions": 0, "responses": 0}
    assert set(run.done_record("sft")["truncated"].values()) == {0}  # the seed data fits the default limits
    # Iteration 2 samples from M2 (iteration 1's DPO output), not from M1, and trains M3 from M2 with M2 as
    # the reference (as the trainer held them).
    assert scripted.loads.count(str(run.model(1))) == 1
    assert run.done_record("iter2/dpo")["policy"] == run.done_record("iter2/dpo")["reference"] == str(run.model(1))
    assert run.done_record("iter1/dpo")["reference"] == str(run.sft_model)
    # Each training stage changed the model it started from, and saved a plain checkpoint (LoRA merged).
    chain = [Path(tiny_model), run.sft_model, run.model(1), run.model(2)]
    for before, after in zip(chain, chain[1:]):
        old, new = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
        assert old.keys() == new.keys() and not any("lora" in key for key in new)
        assert any(not torch.equal(old[key], new[key]) for key in old), f"{after} has the weights of {before}"
    loads = len(scripted.loads)
    assert loop.run(recipe, run, scripted) == rows  # a finished run: nothing reloaded, nothing redone
    assert len(scripted.loads) == loads
    assert yaml.safe_load(run.recipe_path.read_text())["responses"]["n"] == 3


def test_plain_transformers_runs_the_loop_and_its_records_do_not_depend_on_the_batch_size(tiny_model, tmp_path, scripted):
    """`backend.cpu_engine: off` runs every generating stage on plain transformers, and keeps the records
    contract: each row is drawn from its own seed, so the batch size changes speed, not records."""
    runs = {}
    for batch_size in (16, 3):
        recipe = parse_recipe(tiny_recipe(tiny_model, iterations=1, backend={"cpu_engine": "off", "batch_size": batch_size}), "tiny")
        runs[batch_size] = run = RunDir(tmp_path / f"batch{batch_size}")
        loop.run(recipe, run, scripted)
        paths = {stage: run.done_record(f"iter1/{stage}")["inference_path"] for stage in ("prompts", "generate", "judge")}
        assert paths == dict.fromkeys(paths, "plain")
        assert read_jsonl(run.pairs(1)) and (run.model(1) / "model.safetensors").is_file()
    for name in ("prompts", "responses", "judgments", "pairs"):
        assert getattr(runs[3], name)(1).read_bytes() == getattr(runs[16], name)(1).read_bytes(), name


def test_the_loop_measures_policy_agreement_after_dpo_when_the_recipe_asks(tiny_model, tmp_path, scripted):
    pairs = tmp_path / "human.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A careful answer to question {i}.",
                                         "rejected": "No."}) + "\n" for i in range(6)))
    recipe = parse_recipe(tiny_recipe(tiny_model, iterations=1, evaluation={"pairs": str(pairs), "policy": True, "limit": 6}), "tiny")
    run = RunDir(tmp_path / "run")
    (row,) = loop.run(recipe, run, scripted)
    result = json.loads(run.policy_eval(1).read_text())
    assert result["n"] == 6 and result["reference"] == str(run.sft_model) and result["model"] == str(run.model(1))
    assert row["policy_agreement"] == result["accuracy"] and row["policy_agreement_ci"].endswith("n=6")
    assert run.done_record("iter1/evaluate") is not None  # the judge's agreement on the same pairs, as before


class Crash(Exception):
    pass


def test_interrupted_judging_resumes_without_duplicates_or_losses(tiny_model, tmp_path):
    recipe = parse_recipe(tiny_recipe(tiny_model, iterations=1, sft={"enabled": False}), "tiny")
    run = RunDir(tmp_path / "run")
    calls = {"judge": 0}

    def crashing_open(path, config, seed=0, trust_remote_code=False):
        backend = ScriptedJudge(real_open_backend(path, config, seed, trust_remote_code))
        inner_generate = backend.generate

        def generate(prompts, n, sampling):
            if "<response>" in prompts[0]:
                calls["judge"] += 1
                if calls["judge"] == 2:  # after the first chunk reached disk
                    raise Crash()
            return inner_generate(prompts, n, sampling)

        backend.generate = generate
        return backend

    with pytest.raises(Crash):
        loop.run(recipe, run, crashing_open)
    partial = read_jsonl(run.judgments(1))
    assert 0 < len(partial) < 18 and not run.is_done("iter1/judge")
    # A torn write on top of the crash: half a record at the end of the file.
    with run.judgments(1).open("a") as handle:
        handle.write('{"id": "iter1-p00005-r2", "sco')
    loop.run(recipe, run, crashing_open)
    judgments = read_jsonl(run.judgments(1))
    responses = read_jsonl(run.responses(1))
    assert sorted(j["id"] for j in judgments) == sorted(r["id"] for r in responses)
    assert [j["id"] for j in judgments[: len(partial)]] == [j["id"] for j in partial]  # kept, not redone


def test_stage_commands_refuse_to_run_out_of_order(tiny_model, tmp_path):
    from selfreward.errors import UserError

    recipe = parse_recipe(tiny_recipe(tiny_model), "tiny")
    run = RunDir(tmp_path / "run")
    run.bind_recipe(recipe)
    with pytest.raises(UserError, match=r"stage 'iter1/generate' has not finished; run `selfreward generate --iteration 1` first"):
        loop.run_stage(BY_NAME["pairs"], recipe, run, 1, Models(recipe))


def test_each_iteration_measures_the_judge_on_held_out_human_rankings(tiny_model, tmp_path, scripted):
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(
        json.dumps({"id": i, "instruction": f"question {i}", "responses": [{"text": "short", "rank": 1}, {"text": "a longer answer", "rank": 0}]}) + "\n"
        for i in range(3)
    ))
    recipe = parse_recipe(tiny_recipe(tiny_model, iterations=1, sft={"enabled": False},
                                      evaluation={"ranked": str(ranked), "mode": "expected"}), "tiny")
    run = RunDir(tmp_path / "run")
    (row,) = loop.run(recipe, run, scripted)
    report = json.loads((run.iteration(1) / "judge_eval.json").read_text())
    assert report["ranked"]["judge"]["prompts"] == 3 and report["ranked"]["judge"]["pairs"] == 3
    assert report["ranked"]["length_baseline"]["pairwise_accuracy"] == 100  # the longer answer is the better here
    assert row["judge_pairwise_accuracy"] == report["ranked"]["judge"]["pairwise_accuracy"]


@pytest.mark.parametrize("trusted", [True, False])
def test_run_log_says_when_model_code_will_be_executed(tmp_path, caplog, trusted):
    raw = tiny_recipe("org/remote-model", iterations=0, sft={"enabled": False})
    raw["model"]["trust_remote_code"] = trusted
    recipe = parse_recipe(raw, "tiny")
    with caplog.at_level("WARNING"):
        assert loop.run(recipe, RunDir(tmp_path / "run")) == []
    expected = ["model.trust_remote_code is on: code from org/remote-model will be executed"] if trusted else []
    assert [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()] == expected


@pytest.mark.parametrize(("command", "warned"), [("generate", True), ("dpo", True), ("pairs", False)])
def test_stage_commands_that_load_a_model_say_when_its_code_will_be_executed(tmp_path, command, warned):
    from typer.testing import CliRunner

    from selfreward.cli import app

    raw = tiny_recipe("org/remote-model", prompts={"model": "org/writer"})
    raw["model"]["trust_remote_code"] = True
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    # Every stage here stops at once (nothing before it has run), after the warning.
    result = CliRunner().invoke(app, [command, "-r", str(recipe), "-o", str(tmp_path / "run"), "-t", "1"])
    assert result.exit_code == 2 and "has not finished" in result.output
    message = "model.trust_remote_code is on: code from org/remote-model and org/writer will be executed"
    assert (message in " ".join(result.output.split())) == warned
