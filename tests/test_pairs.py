from __future__ import annotations

from selfreward.run.jsonl import read_jsonl
from selfreward.stages.pairs import run_pairs


def candidates(prompt_id, scores, tokens=None):
    tokens = tokens or [10] * len(scores)
    responses = [{"id": f"{prompt_id}-r{i}", "prompt_id": prompt_id, "instruction": f"do {prompt_id}",
                  "response": f"answer {i}", "tokens": tokens[i]} for i in range(len(scores))]
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


def test_length_control_pairs_the_shortest_of_the_top_band_with_the_longest_of_the_bottom_band(tmp_path):
    scores = [5.0, 4.5, 4.0, 3.0, 2.0, 1.5, 1.0, 0.0]
    tokens = [90, 40, 20, 5, 70, 100, 30, 60]
    responses, judgments = candidates("p", scores, tokens)
    for rho, chosen, rejected in ((0.0, "p-r0", "p-r7"), (0.1, "p-r1", "p-r7"), (0.2, "p-r2", "p-r7"), (0.5, "p-r3", "p-r5")):
        result = run_pairs(responses, judgments, tmp_path / "pairs.jsonl", seed=0, rho=rho)
        (pair,) = read_jsonl(tmp_path / "pairs.jsonl")
        assert (pair["chosen_id"], pair["rejected_id"]) == (chosen, rejected), rho
        # The band definitions, checked against every candidate: chosen shortest of its band, rejected longest of its.
        top = [i for i, s in enumerate(scores) if s >= (1 - rho) * 5.0 + rho * 0.0]
        bottom = [i for i, s in enumerate(scores) if s <= (1 - rho) * 0.0 + rho * 5.0 and s < pair["chosen_score"]]
        assert pair["chosen_tokens"] == min(tokens[i] for i in top) and pair["rejected_tokens"] == max(tokens[i] for i in bottom)
        assert result["length_control"] == rho
    # Off: the paper's best vs worst, and no length fields (the records as before the switch existed).
    run_pairs(responses, judgments, tmp_path / "pairs.jsonl", seed=0)
    (pair,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert (pair["chosen_id"], pair["rejected_id"]) == ("p-r0", "p-r7") and "chosen_tokens" not in pair


def test_length_control_is_refused_out_of_range_and_per_iteration_lists_must_fit(tmp_path):
    import pytest

    from selfreward.errors import UserError
    from selfreward.recipe import parse_recipe

    with pytest.raises(UserError, match=r"pairs\.length_control.*every rho must be in \[0, 0\.5\]"):
        parse_recipe({"pairs": {"length_control": 0.7}}, "r")
    with pytest.raises(UserError, match=r"pairs\.length_control: a list needs one rho per iteration \(3\), got 2"):
        parse_recipe({"iterations": 3, "pairs": {"length_control": [0, 0.1]}}, "r")
    recipe = parse_recipe({"iterations": 3, "pairs": {"length_control": [None, 0.0, 0.1]}}, "r")
    assert [recipe.pairs.rho(t) for t in (1, 2, 3)] == [None, 0.0, 0.1]


def test_length_control_in_the_loop_pairs_by_band_each_iteration(tiny_model, tmp_path):
    from selfreward import loop
    from selfreward.recipe import parse_recipe
    from selfreward.run.directory import RunDir
    from tests.test_pipeline import Scripted, tiny_recipe

    recipe = parse_recipe(tiny_recipe(tiny_model, pairs={"length_control": [None, 0.0]}), "tiny")
    run = RunDir(tmp_path / "run")
    loop.run(recipe, run, Scripted())
    for t, rho in ((1, None), (2, 0.0)):
        responses = {r["id"]: r for r in read_jsonl(run.responses(t))}
        scores = {j["id"]: j["score"] for j in read_jsonl(run.judgments(t))}
        pairs = read_jsonl(run.pairs(t))
        assert pairs and run.done_record(f"iter{t}/pairs").get("length_control") == rho
        for pair in pairs:
            if rho is None:
                assert "chosen_tokens" not in pair
                continue
            mine = [i for i, r in responses.items() if r["prompt_id"] == pair["id"] and scores[i] is not None]
            high, low = max(scores[i] for i in mine), min(scores[i] for i in mine)
            assert pair["chosen_tokens"] == min(responses[i]["tokens"] for i in mine if scores[i] == high)
            assert pair["rejected_tokens"] == max(responses[i]["tokens"] for i in mine if scores[i] == low)
