from __future__ import annotations

from selfreward.run.jsonl import read_jsonl
from selfreward.stages.pairs import run_pairs


def candidates(prompt_id, scores):
    responses = [{"id": f"{prompt_id}-r{i}", "prompt_id": prompt_id, "instruction": f"do {prompt_id}",
                  "response": f"answer {i}"} for i in range(len(scores))]
    judgments = [{"id": r["id"], "score": s} for r, s in zip(responses, scores)]
    return responses, judgments


def test_best_vs_worst_and_ties_dropped(tmp_path):
    r1, j1 = candidates("a", [2.0, 4.5, 1.0, 3.0])
    r2, j2 = candidates("b", [3.0, 3.0, 3.0, 3.0])
    r3, j3 = candidates("c", [None, 2.0, None, None])
    result = run_pairs(r1 + r2 + r3, j1 + j2 + j3, tmp_path / "pairs.jsonl", seed=0)
    assert result["pairs"] == 1 and result["ties_dropped"] == 1 and result["unscored_dropped"] == 1
    (pair,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert pair["chosen_id"] == "a-r1" and pair["rejected_id"] == "a-r2"
    assert pair["prompt"] == [{"role": "user", "content": "do a"}]
    assert pair["chosen"][0]["content"] == "answer 1" and pair["rejected"][0]["content"] == "answer 2"


def test_tie_break_among_several_best_is_deterministic_per_seed(tmp_path):
    chosen_by_seed = {}
    for seed in range(20):
        responses, judgments = candidates("p", [5.0, 5.0, 5.0, 1.0])
        run_pairs(responses, judgments, tmp_path / "pairs.jsonl", seed=seed)
        first = read_jsonl(tmp_path / "pairs.jsonl")[0]["chosen_id"]
        run_pairs(responses, judgments, tmp_path / "pairs.jsonl", seed=seed)
        assert read_jsonl(tmp_path / "pairs.jsonl")[0]["chosen_id"] == first
        chosen_by_seed[seed] = first
    assert len(set(chosen_by_seed.values())) > 1  # the seed, not the order, decides


def test_pairs_file_loads_with_datasets_as_trl_preference_data(tmp_path):
    from datasets import load_dataset

    responses, judgments = candidates("a", [1.0, 2.0])
    run_pairs(responses, judgments, tmp_path / "pairs.jsonl")
    dataset = load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
