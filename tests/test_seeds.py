from __future__ import annotations

import json

import pytest

from selfreward.data.seeds import load_eft, load_ift, load_oasst1_messages, oasst1_seeds
from selfreward.errors import UserError
from selfreward.judge import parse_score
from tests.conftest import ROOT, SHARED

OASST1 = SHARED / "oasst1" / "sample.jsonl"


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


@pytest.mark.skipif(not OASST1.is_file(), reason="needs the shared oasst1 sample beside the repository")
def test_oasst1_first_turns_become_ift_and_ranked_eft():
    messages = load_oasst1_messages(str(OASST1))
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
