from __future__ import annotations

import json

import pytest

from selfreward.data.seeds import load_eft, load_ift, load_oasst1_messages, oasst1_seeds
from selfreward.errors import UserError
from selfreward.judge import parse_score
from tests.conftest import OASST1_SAMPLE, ROOT


def test_project_seed_data_is_valid_and_spread():
    ift = load_ift(ROOT / "data" / "ift.jsonl")
    eft = load_eft(ROOT / "data" / "eft.jsonl")
    assert len(ift) >= 64 and len(eft) >= 32
    assert {r["score"] for r in eft} == {0, 1, 2, 3, 4, 5}


def test_eft_judgment_must_end_in_its_score(tmp_path):
    path = tmp_path / "eft.jsonl"
    path.write_text(json.dumps({"id": "e", "instruction": "q", "response": "a", "judgment": "Good.\nScore: 3", "score": 4}) + "\n")
    with pytest.raises(UserError, match="judgment does not end in 'Score: 4'"):
        load_eft(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "ift.jsonl"
    line = json.dumps({"id": "a", "instruction": "q", "response": "r"})
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(UserError, match="duplicate id 'a'"):
        load_ift(path)


def test_oasst1_first_turns_become_ift_and_ranked_eft():
    messages = load_oasst1_messages(str(OASST1_SAMPLE))
    ift, eft = oasst1_seeds(messages)
    by_id = {m["message_id"]: m for m in messages}
    roots = {m["message_id"] for m in messages if m["parent_id"] is None and m["lang"] == "en" and not m["deleted"]}
    assert 0 < len(ift) <= len(roots)
    for record in ift:  # the best-ranked, undeleted reply to an English first turn
        assert record["id"] in roots
        best = [m for m in messages if m["parent_id"] == record["id"] and m["role"] == "assistant"
                and m["rank"] == 0 and not m["deleted"]]
        assert [m["text"] for m in best] == [record["response"]]
    for record in eft:
        reply = by_id[record["id"]]
        assert reply["parent_id"] == record["prompt_id"] and not reply["deleted"]
        assert parse_score(record["judgment"]) == record["score"]
    # Within a prompt, a better human rank never gets a lower score.
    by_prompt = {}
    for record in eft:
        by_prompt.setdefault(record["prompt_id"], []).append(record)
    for records in by_prompt.values():
        ordered = sorted(records, key=lambda r: r["rank"])
        assert [r["score"] for r in ordered] == sorted((r["score"] for r in ordered), reverse=True)


def test_judged_eft_keeps_only_judgment_sets_that_order_responses_as_humans(tiny_model):
    from selfreward.backends.base import Backend, Completion
    from selfreward.data.preferences import RankedPrompt
    from selfreward.data.seeds import judged_eft, orders_as_humans
    from selfreward.judge import Judge
    from selfreward.models import load_tokenizer

    class Scripted(Backend):
        chunk_prompts = 64

        def __init__(self, scores_by_response):
            self.tokenizer = load_tokenizer(tiny_model)
            self.scores = scores_by_response

        def generate(self, prompts, n, sampling):
            return [[Completion(f"ok\nScore: {s}", 3, True) for s in self.scores[next(r for r in self.scores if r in p)]] for p in prompts]

        def next_token_probs(self, prompts, token_ids):
            raise NotImplementedError

    assert orders_as_humans([5, 3, 1], (0, 1, 2)) and not orders_as_humans([3, 3, 1], (0, 1, 2))
    prompts = [RankedPrompt("a", "qa", ("best-a", "worst-a"), (0, 1)), RankedPrompt("b", "qb", ("best-b", "worst-b"), (0, 1))]
    # Prompt a: sample 0 disagrees with the humans, sample 1 agrees. Prompt b: no sample agrees.
    backend = Scripted({"best-a": [1, 4], "worst-a": [3, 2], "best-b": [2, 2], "worst-b": [2, 5]})
    records, kept = judged_eft(Judge(backend, samples=2), prompts)
    assert kept == 1
    assert [(r["response"], r["score"]) for r in records] == [("best-a", 4), ("worst-a", 2)]
    assert all(r["judgment"].endswith(f"Score: {r['score']}") for r in records)


def synthetic_oasst1(trees: int) -> list[dict]:
    """oasst1-shaped messages: `trees` English first turns, each with three ranked replies."""
    messages = []
    for t in range(trees):
        root = f"root-{t}"
        messages.append({"message_id": root, "parent_id": None, "message_tree_id": root, "role": "prompter", "lang": "en",
                         "text": f"Question number {t}?", "deleted": False, "review_result": True, "rank": None})
        for rank in range(3):
            messages.append({"message_id": f"{root}-r{rank}", "parent_id": root, "message_tree_id": root, "role": "assistant",
                             "lang": "en", "text": f"Answer {rank} to {t}." + " more" * rank, "deleted": False,
                             "review_result": True, "rank": rank})
    return messages


def test_oasst1_split_by_tree_puts_no_conversation_in_two_parts():
    from selfreward.recipe import TreeShares

    messages = synthetic_oasst1(200)
    ift, eft = oasst1_seeds(messages, TreeShares(ift=0.5, eft=0.3, heldout=0.2))
    ift_trees, eft_trees = {r["id"] for r in ift}, {r["prompt_id"] for r in eft}
    assert not ift_trees & eft_trees
    heldout = 200 - len(ift_trees) - len(eft_trees)
    assert 70 < len(ift_trees) < 130 and 35 < len(eft_trees) < 85 and 15 < heldout < 65  # shares 0.5 / 0.3 / 0.2
    assert all(len([r for r in eft if r["prompt_id"] == tree]) == 3 for tree in eft_trees)  # a tree's replies stay together
    # The part of a tree follows from its id alone: the same with the other trees gone.
    alone = oasst1_seeds([m for m in messages if m["message_tree_id"] in ift_trees], TreeShares(ift=0.5, eft=0.3, heldout=0.2))
    assert {r["id"] for r in alone[0]} == ift_trees and alone[1] == []
    # Without a split every tree feeds both, as before.
    assert len(oasst1_seeds(messages)[0]) == 200 and len(oasst1_seeds(messages)[1]) == 600


def test_tree_shares_must_add_up_to_one(tmp_path):
    from selfreward.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("data: {oasst1_trees: {ift: 0.5, eft: 0.3, heldout: 0.3}}\n")
    with pytest.raises(UserError, match="oasst1_trees.*must be 1"):
        load_recipe(path)


def test_ift_answers_longer_than_the_limit_are_left_out_and_counted(tmp_path):
    from selfreward.data.seeds import load_seeds
    from selfreward.recipe import DataSection, LimitsSection

    path = tmp_path / "ift.jsonl"
    path.write_text("".join(json.dumps({"id": f"i{n}", "instruction": f"q{n}", "response": "x" * (10 * n)}) + "\n" for n in range(1, 6)))
    ift, _, counts = load_seeds(DataSection(ift=str(path), eft=None, max_ift_response_chars=30), 0, LimitsSection())
    assert [r["id"] for r in ift] == ["i1", "i2", "i3"] and counts["ift_responses_over_max_chars"] == 2
    with pytest.raises(UserError, match="max_ift_response_chars: every one of the 5 IFT responses is longer than 5"):
        load_seeds(DataSection(ift=str(path), eft=None, max_ift_response_chars=5), 0, LimitsSection())


def test_evaluation_leaves_out_prompts_that_are_seed_instructions(tmp_path):
    from selfreward.data.seeds import seed_instructions
    from selfreward.judge.agreement import evaluate_judge
    from selfreward.judge.policy import human_pairs
    from selfreward.recipe import DataSection, LimitsSection, TreeShares

    messages = synthetic_oasst1(60)
    source = tmp_path / "oasst1.jsonl"
    source.write_text("".join(json.dumps(m) + "\n" for m in messages))
    data = DataSection(ift=None, eft=None, oasst1=str(source), oasst1_trees=TreeShares(ift=0.5, eft=0.3, heldout=0.2), max_ift=3)
    seen = seed_instructions(data, 0, LimitsSection())
    ift, eft = oasst1_seeds(messages, data.oasst1_trees)
    assert len(seen) == len(ift) + len({r["prompt_id"] for r in eft})  # every seed tree, also those max_ift leaves out
    report = evaluate_judge(None, source, None, None, exclude=seen)
    assert report["ranked"]["dropped_seen_in_seeds"] == len(seen) and report["ranked"]["length_baseline"]["prompts"] == 60 - len(seen)
    pairs = human_pairs(source, None, None, exclude=seen)
    assert len(pairs) == 3 * (60 - len(seen)) and not {p.instruction.lower() for p in pairs} & seen


def test_ranked_responses_from_parquet_or_an_unreachable_hub_id(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from selfreward.data.preferences import load_ranked

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here: fail at once, not after network retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    messages = synthetic_oasst1(5)
    datasets.Dataset.from_list(messages).to_parquet(str(tmp_path / "oasst1.parquet"))
    assert len(load_ranked(tmp_path / "oasst1.parquet")) == 5
    with pytest.raises(UserError, match="ranked responses: cannot load 'no-such-org/no-such-set'"):
        load_ranked("no-such-org/no-such-set")
