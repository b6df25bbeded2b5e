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


def golden_fixture():
    """Synthetic candidates with ties, unscored ones and equal scores, the same on every machine."""
    import random

    rng = random.Random(7)
    responses, judgments = [], []
    for p in range(40):
        for i in range(4):
            rid = f"p{p}-r{i}"
            responses.append({"id": rid, "prompt_id": f"p{p}", "index": i, "instruction": f"Task {p}?",
                              "response": "x" * rng.randint(1, 60), "tokens": rng.randint(1, 60), "finished": True})
            score = rng.choice([None, 1.0, 2.0, 2.0, 3.0, 3.0, 4.5, 5.0]) if p % 7 else 3.0
            judgments.append({"id": rid, "prompt_id": f"p{p}", "score": score})
    return responses, judgments


def test_with_every_switch_off_the_pairs_file_is_byte_identical_to_the_paper_method_before_the_switches(tmp_path):
    """The digest was written by run_pairs at 7484e67, before length control, anchors and consistency existed."""
    import hashlib

    responses, judgments = golden_fixture()
    result = run_pairs(responses, judgments, tmp_path / "pairs.jsonl", seed=3)
    assert (result["pairs"], result["ties_dropped"], result["unscored_dropped"]) == (32, 8, 0)
    digest = hashlib.sha256((tmp_path / "pairs.jsonl").read_bytes()).hexdigest()
    assert digest == "e901eaa890ac9f426e4bb18911e21fe3d0c82a41d51e77987b961c202bfb3a28"


def test_an_anchor_supplies_every_rejected_answer_and_m_t_every_chosen_one(tmp_path):
    own_r, own_j = candidates("a", [2.0, 4.0, 3.0])
    anchor_r, anchor_j = candidates("a", [1.0, 5.0, 2.0])
    for r in anchor_r:
        r["id"] = r["id"].replace("-r", "-a")
    for j in anchor_j:
        j["id"] = j["id"].replace("-r", "-a")
    # b: the anchor's worst (4.0) is no worse than M_t's best: a tie, dropped. c: the anchor has no scores.
    b_r, b_j = candidates("b", [3.0, 4.0])
    ba_r, ba_j = candidates("b", [4.0, 5.0])
    c_r, c_j = candidates("c", [1.0, 2.0])
    ca_r, ca_j = candidates("c", [None, None])
    for r in ba_r + ca_r:
        r["id"] = r["id"].replace("-r", "-a")
    for j in ba_j + ca_j:
        j["id"] = j["id"].replace("-r", "-a")
    result = run_pairs(own_r + b_r + c_r, own_j + b_j + c_j, tmp_path / "pairs.jsonl", seed=0,
                       anchor=(anchor_r + ba_r + ca_r, anchor_j + ba_j + ca_j))
    (pair,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert (pair["chosen_id"], pair["rejected_id"]) == ("a-r1", "a-a0")  # M_t's best against the anchor's worst
    assert (result["pairs"], result["ties_dropped"], result["unscored_dropped"], result["anchored"]) == (1, 1, 1, 3)


def test_kendall_tau_b_matches_scipy_with_ties_and_consistency_follows_it():
    import random

    from scipy.stats import kendalltau

    from selfreward.stages.pairs import consistency, kendall_tau_b

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 6)
        x = [rng.choice([1.0, 2.0, 3.0, 4.5]) for _ in range(n)]
        y = [rng.choice([0.0, 2.0, 3.5, 5.0]) for _ in range(n)]
        expected = kendalltau(x, y, variant="b").statistic
        found = kendall_tau_b(x, y)
        assert (found is None) if expected != expected else abs(found - expected) < 1e-12
    cands = [{"id": "r0", "score": 1.0}, {"id": "r1", "score": 3.0}, {"id": "r2", "score": 5.0}, {"id": "r3", "score": None}]
    assert consistency(cands, {"r0": 0.0, "r1": 2.0, "r2": 4.0, "r3": 5.0}) == 1.0  # same order (r3 unscored by M_t)
    assert consistency(cands, {"r0": 4.0, "r1": 2.0, "r2": 0.0}) == 0.0  # reversed
    assert consistency(cands, {"r0": 3.0, "r1": 3.0, "r2": 3.0}) == 0.5  # M_{t-1} sees no difference: undefined


def test_anchor_and_consistency_in_the_loop_change_only_what_they_say(tiny_model, tmp_path):
    from selfreward import loop
    from selfreward.recipe import parse_recipe
    from selfreward.run.directory import RunDir
    from selfreward.stages.pairs import consistency
    from tests.test_pipeline import Scripted, tiny_recipe

    recipe = parse_recipe(tiny_recipe(tiny_model, pairs={"anchor": "m1"}, dpo={"consistency_weighting": True}), "tiny")
    run = RunDir(tmp_path / "run")
    scripted = Scripted()
    loop.run(recipe, run, scripted)
    # Iteration 1: the anchor would be M_t and M_0 is no judge: empty files, the paper's pairs, plain DPO.
    assert read_jsonl(run.anchor_responses(1)) == [] == read_jsonl(run.previous_judgments(1))
    assert run.done_record("iter1/anchor-generate")["anchor"] is None
    assert all("consistency" not in pair and "-r" in pair["rejected_id"] for pair in read_jsonl(run.pairs(1)))
    # Iteration 2: M1 answers the same prompts and M_t judges them; M1 also judges M2's candidates.
    anchor_ids = {r["id"] for r in read_jsonl(run.anchor_responses(2))}
    prompts = {p["id"] for p in read_jsonl(run.prompts(2))}
    assert {r["prompt_id"] for r in read_jsonl(run.anchor_responses(2))} == prompts
    assert {j["id"] for j in read_jsonl(run.anchor_judgments(2))} == anchor_ids
    assert run.done_record("iter2/anchor-generate")["anchor"] == str(run.sft_model)
    assert run.done_record("iter2/consistency-judge")["judge"] == str(run.sft_model)
    pairs = read_jsonl(run.pairs(2))
    assert pairs and all(p["rejected_id"] in anchor_ids and p["chosen_id"].split("-")[-1].startswith("r") for p in pairs)
    responses = read_jsonl(run.responses(2))
    scores = {j["id"]: j["score"] for j in read_jsonl(run.judgments(2))}
    previous = {j["id"]: j["score"] for j in read_jsonl(run.previous_judgments(2))}
    for pair in pairs:
        mine = [{**r, "score": scores[r["id"]]} for r in responses if r["prompt_id"] == pair["id"]]
        assert pair["consistency"] == round(consistency(mine, previous), 6)
    assert str(run.sft_model) in scripted.loads[scripted.loads.index(str(run.model(1))):]  # M1 loaded again in iteration 2
