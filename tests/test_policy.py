"""Policy agreement: the DPO policy's implicit reward as a classifier of human pairs (tiny random model)."""

from __future__ import annotations

import json

from selfreward.judge.policy import HumanPair, agreement, evaluate_policy
from selfreward.recipe import DpoSection
from selfreward.stages.dpo import run_dpo

PAIRS = [HumanPair(f"Question {i}?", f"A careful answer to question {i}.", "No.") for i in range(8)]


def test_a_model_against_itself_ties_everywhere_and_scores_fifty(tiny_model):
    result = evaluate_policy(tiny_model, tiny_model, PAIRS)
    assert result["n"] == 8 and result["ties"] == 8 and result["accuracy"] == 50.0


def test_dpo_on_human_pairs_raises_agreement_on_those_pairs(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p.instruction}], "chosen": [{"role": "assistant", "content": p.chosen}],
        "rejected": [{"role": "assistant", "content": p.rejected}]}) + "\n" for p in PAIRS))
    config = DpoSection(epochs=2, learning_rate=1e-3, batch_size=2, gradient_accumulation_steps=1, precision="fp32",
                        max_length=128, save_steps=None, save_minutes=None, lora={"enabled": True, "r": 4, "alpha": 8})
    run_dpo(tiny_model, pairs, config, tmp_path / "m2", 0)
    result = evaluate_policy(str(tmp_path / "m2"), tiny_model, PAIRS)
    assert result["n"] == 8 and result["accuracy"] > 75 and result["mean_margin"] > 0
    swapped = evaluate_policy(str(tmp_path / "m2"), tiny_model, [HumanPair(p.instruction, p.rejected, p.chosen) for p in PAIRS])
    assert swapped["accuracy"] < 25  # the direction is DPO's, not an artefact of the measure


def test_agreement_counts_ties_half_and_reports_a_seeded_interval():
    result = agreement([(1.0, 0.0)] * 6 + [(0.0, 0.0)] * 2 + [(0.0, 1.0)] * 2 + [(float("nan"), 0.0)])
    assert result["n"] == 10 and result["not_computable"] == 1 and result["accuracy"] == 70.0
    low, high = result["accuracy_ci"]
    assert low < 70 < high and agreement([(1.0, 0.0)] * 6 + [(0.0, 0.0)] * 2 + [(0.0, 1.0)] * 2) == {**result, "not_computable": 0}


def test_the_reference_side_can_come_from_before_and_gives_the_same_result(tiny_model):
    first = evaluate_policy(tiny_model, tiny_model, PAIRS)
    reused = evaluate_policy(tiny_model, "elsewhere", PAIRS, reference_logprobs=first["logprobs"]["model"])
    assert reused["accuracy"] == first["accuracy"] and reused["logprobs"] == first["logprobs"]
