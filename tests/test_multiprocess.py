"""SFT and DPO under `accelerate launch` with 2 CPU processes (gloo): one checkpoint that loads, one done
record, and the losses of the single-process run with the same global batch."""

from __future__ import annotations

import json

import pytest

from selfreward import loop
from selfreward.models import load_causal_lm
from selfreward.recipe import parse_recipe
from selfreward.run.directory import RunDir
from selfreward.stages import BY_NAME
from selfreward.stages.context import Models
from tests.test_pipeline import tiny_recipe

pytestmark = pytest.mark.slow


def train_both(tiny_model, root, processes: int) -> RunDir:
    """SFT, then DPO on a fixed set of pairs, with `processes` processes and a global batch of 4."""
    training = {"batch_size": 4 // processes, "gradient_accumulation_steps": 1, "save_minutes": None}
    recipe = parse_recipe(tiny_recipe(
        tiny_model, iterations=1, launcher={"num_processes": processes, "main_process_port": 29600 + processes},
        sft={**training, "group_by_length": False}, dpo=training,
    ), "tiny")
    run = RunDir(root)
    run.bind_recipe(recipe)
    with Models(recipe) as models:
        loop.run_stage(BY_NAME["sft"], recipe, run, 0, models)
        run.iteration(1).mkdir(parents=True, exist_ok=True)
        run.pairs(1).write_text("".join(json.dumps({
            "id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"A careful answer to question {i}."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }) + "\n" for i in range(8)))
        for stage in ("prompts", "generate", "judge", "pairs"):  # DPO's inputs, made by hand above
            run.mark_done(f"iter1/{stage}", {})
        loop.run_stage(BY_NAME["dpo"], recipe, run, 1, models)
    return run


def test_sft_and_dpo_with_two_processes_match_one_process(tiny_model, tmp_path):
    one = train_both(tiny_model, tmp_path / "one", 1)
    two = train_both(tiny_model, tmp_path / "two", 2)
    for key, model in (("sft", two.sft_model), ("iter1/dpo", two.model(1))):
        record, single = two.done_record(key), one.done_record(key)
        print(f"\n{key}: losses per step, 2 processes {[e['loss'] for e in record['log']]}, "
              f"1 process {[e['loss'] for e in single['log']]}")
        assert record["processes"] == 2 and single["processes"] == 1
        assert record["steps"] == single["steps"] > 1
        # Every logged loss, the first step's included (DPO's first loss is ln 2 whatever the data, so
        # the second step is what shows that both runs saw the same batches).
        for mine, theirs in zip(record["log"], single["log"]):
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert (model / "model.safetensors").is_file() and not (model / "adapter_config.json").exists()
        load_causal_lm(str(model))
    assert sorted(p.name for p in (two.root / "done").rglob("*.json")) == sorted(p.name for p in (one.root / "done").rglob("*.json"))
    assert not list(two.root.rglob(".*.work"))  # trainer checkpoints cleaned up
