from __future__ import annotations

import gzip
import json

import pytest

from selfreward.evaluation import evaluate_judge, load_pairs, load_ranked, pair_metrics, ranked_metrics
from tests.conftest import SHARED


def test_perfect_judge_scores_full_marks():
    metrics = ranked_metrics([[5, 3, 1], [4, 2]], [[0, 1, 2], [0, 1]])
    assert metrics["pairwise_accuracy"] == 100 and metrics["exact_match"] == 100
    assert metrics["five_best"] == 50  # only the first prompt's best got a 5
    assert metrics["spearman"] == pytest.approx(1) and metrics["kendall_tau"] == pytest.approx(1)


def test_reversed_judge_and_ties_and_missing_scores():
    reversed_ = ranked_metrics([[1, 3, 5]], [[0, 1, 2]])
    assert reversed_["pairwise_accuracy"] == 0 and reversed_["spearman"] == pytest.approx(-1)
    tied = ranked_metrics([[3, 3, None]], [[0, 1, 2]])
    assert tied["pairwise_accuracy"] == 0 and tied["exact_match"] == 0 and tied["spearman"] is None
    # Pairs the humans tied are not counted.
    assert ranked_metrics([[5, 1, 1]], [[0, 0, 1]])["pairs"] == 2


def test_pair_metrics_count_ties_as_misses():
    assert pair_metrics([5, 3, 2, None], [1, 3, 4, 1]) == {"pairs": 4, "pairwise_accuracy": 25.0}


def test_hh_rlhf_dialogues_split_at_the_last_assistant_turn(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a color\n\nAssistant: "
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"chosen": dialogue + "Blue.", "rejected": dialogue + "No."}) + "\n")
    (pair,) = load_pairs(path)
    assert pair.chosen == "Blue." and pair.rejected == "No."
    assert pair.instruction.endswith("Human: name a color") and "Assistant: hello" in pair.instruction


@pytest.mark.skipif(not (SHARED / "oasst1" / "sample.jsonl").is_file(), reason="needs the shared oasst1 sample")
def test_length_baseline_on_real_oasst1_first_turns_beats_chance():
    prompts = load_ranked(SHARED / "oasst1" / "sample.jsonl")
    assert len(prompts) >= 50 and all(len(p.responses) >= 2 for p in prompts)
    metrics = ranked_metrics([[float(len(r)) for r in p.responses] for p in prompts], [p.ranks for p in prompts])
    assert 55 < metrics["pairwise_accuracy"] < 85  # humans favour longer answers; about 68 % on full oasst1


def test_ranked_file_errors_name_the_line(tmp_path):
    from selfreward.errors import UserError

    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"instruction": "q", "responses": [{"text": "a", "rank": 0}]}) + "\n")
    with pytest.raises(UserError, match="ranked.jsonl:1: expected"):
        load_ranked(path)


def test_pairwise_method_compares_every_human_ordered_pair(tmp_path, tiny_model):
    from selfreward.judge import Judge
    from selfreward.models import load_tokenizer
    from tests.test_judge import PairwiseBackend

    path = tmp_path / "ranked.jsonl"
    responses = [{"text": "good and long", "rank": 0}, {"text": "fine", "rank": 1}, {"text": "bad", "rank": 2},
                 {"text": "also bad", "rank": 2}]
    path.write_text(json.dumps({"instruction": "q", "responses": responses}) + "\n")
    # A judge that prefers the longer response, whatever the order: it agrees with the humans on 4 of 5
    # ordered pairs ("also bad" beats "fine" on length); the tied-rank pair is not asked.
    backend = PairwiseBackend(load_tokenizer(tiny_model), lambda a, b: "A" if len(a) >= len(b) else "B")
    report = evaluate_judge(Judge(backend, samples=1), path, None, None, method="pairwise")
    judge = report["ranked"]["judge"]
    assert judge["pairs"] == 5 and len(backend.prompts) == 10
    assert judge["pairwise_accuracy"] == 80.0 and judge["position_consistency"] == 100.0
    assert report["ranked"]["length_baseline"]["pairwise_accuracy"] == 80.0


def test_judge_eval_cuts_what_the_judge_reads_but_not_the_length_baseline(tmp_path, tiny_model):
    from selfreward.judge import Judge
    from selfreward.models import load_tokenizer
    from tests.test_judge import PairwiseBackend

    path = tmp_path / "pairs.jsonl"
    long_answer = "word " * 100
    path.write_text(json.dumps({"prompt": "q", "chosen": long_answer, "rejected": "short"}) + "\n")
    seen = []
    backend = PairwiseBackend(load_tokenizer(tiny_model), lambda a, b: seen.append((a, b)) or "A")
    report = evaluate_judge(Judge(backend, samples=1), None, path, None, "pairwise", max_chars=(50, 40))
    assert report["pairs"]["truncated"] == 1
    assert max(len(text) for pair in seen for text in pair) <= 40
    assert report["pairs"]["length_baseline"]["pairwise_accuracy"] == 100.0  # full lengths
