from __future__ import annotations

import json

import pytest

from selfreward.errors import UserError
from selfreward.judge import parse_score
from selfreward.seeds import load_eft, load_ift, load_oasst1_messages, oasst1_seeds
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
