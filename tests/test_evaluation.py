from __future__ import annotations

import gzip
import json

import pytest

from selfreward.data.preferences import load_pairs, load_ranked
from selfreward.judge import JudgeResult
from selfreward.judge.agreement import evaluate_judge, pair_metrics, ranked_metrics
from tests.conftest import OASST1_SAMPLE


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


class TableJudge:
    """A judge that looks its results up: (instruction, response) -> (score, parse failures)."""

    def __init__(self, table: dict[tuple[str, str], tuple[float | None, int]]):
        self.table = table
        self.seen: list[tuple[str, str]] = []

    def score_all(self, items, label: str = "judging") -> list[JudgeResult]:
        self.seen += [(item.instruction, item.response) for item in items]
        return [JudgeResult(score, parse_failures=failures)
                for score, failures in (self.table[item.instruction, item.response] for item in items)]


# Five instructions; each response is one letter repeated, so its length is the length baseline's score.
# (instruction, [(response, human rank, judge score, judge parse failures)])
RANKED = [
    ("q1", [("a" * 30, 0, 5, 0), ("b" * 10, 1, 4, 0), ("c" * 20, 2, 2, 0)]),  # judge agrees everywhere
    ("q2", [("x" * 12, 0, 4, 0), ("y" * 6, 1, 3, 1), ("z" * 6, 1, 3, 0)]),  # humans tie y, z; so does the judge
    ("q3", [("u" * 7, 0, 5, 0), ("v" * 9, 1, 5, 0), ("w" * 3, 2, 1, 0)]),  # the judge ties u, v; humans don't
    ("q4", [("m" * 4, 0, 3, 0), ("n" * 4, 0, 5, 0), ("o" * 4, 1, 4, 0)]),  # humans tie for best; n gets the 5
    ("q5", [("r" * 20, 0, None, 3), ("s" * 11, 1, 2, 0)]),  # the judge could not score r
]
# Pairs: (chosen, rejected, judge score of chosen, of rejected, parse failures)
PAIRS = [("C" * 9, "R" * 3, 5, 2, 0), ("D" * 2, "S" * 5, 3, 3, 0), ("E" * 6, "T" * 4, 1, 4, 0),
         ("F" * 5, "U" * 5, 4, None, 2)]


def test_judge_eval_metrics_match_a_hand_computed_example(tmp_path):
    ranked, pairs = tmp_path / "ranked.jsonl", tmp_path / "pairs.jsonl"
    ranked.write_text("".join(json.dumps({"id": q, "instruction": q, "responses": [{"text": t, "rank": r} for t, r, _, _ in rs]})
                              + "\n" for q, rs in RANKED))
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": c, "rejected": r}) + "\n"
                             for i, (c, r, _, _, _) in enumerate(PAIRS)))
    table = {(q, t): (score, failures) for q, rs in RANKED for t, _, score, failures in rs}
    for i, (c, r, score_c, score_r, failures) in enumerate(PAIRS):
        table[f"p{i}", c], table[f"p{i}", r] = (score_c, 0), (score_r, failures)
    judge = TableJudge(table)

    report = evaluate_judge(judge, ranked, pairs, None)

    assert sorted(judge.seen) == sorted(table)  # every response judged once, under its own instruction
    assert report["ranked"]["truncated"] == 0 and report["pairs"]["truncated"] == 0
    # Judge. Human-ordered pairs (human ties skipped): q1 3 of 3 agree; q2 2 of 2 ((y, z) skipped);
    # q3 2 of 3 (u = v is a miss); q4 1 of 2 ((m, n) skipped; m 3 < o 4 misses, n 5 > o 4 agrees);
    # q5 0 of 1 (None misses): 8 of 11 = 72.73 %.
    # 5-best: q1 (a = 5), q3 (u = 5), q4 (n, tied best, = 5): 3 of 5 = 60 %.
    # Exact match: q1, q2 (ties y = z as the humans do): 2 of 5 = 40 %.
    # Spearman (scores vs -rank), q5 undefined (None): q1 1; q2 1 (ranks [3, 1.5, 1.5] both sides);
    # q3 score ranks [2.5, 2.5, 1] vs [3, 2, 1]: 1.5 / sqrt(1.5 * 2) = sqrt(3)/2 = 0.8660;
    # q4 [1, 3, 2] vs [2.5, 2.5, 1]: covariance 0, so 0. Mean (2 + 0.8660) / 4 = 0.7165.
    # Kendall tau-b: q1 1; q2 2 / sqrt(2 * 2) = 1; q3 2 concordant, 1 pair tied in scores only:
    # 2 / sqrt(2 * 3) = 0.8165; q4 1 concordant (n, o), 1 discordant (m, o): 0. Mean 0.7041.
    judge_metrics = {k: v for k, v in report["ranked"]["judge"].items() if k != "seconds"}
    assert judge_metrics == {"prompts": 5, "pairs": 11, "pairwise_accuracy": 72.73, "five_best": 60.0,
                             "exact_match": 40.0, "spearman": 0.7165, "kendall_tau": 0.7041, "parse_failures": 4}
    # Length baseline. Pairs: q1 2 of 3 (b 10 < c 20 misses); q2 2 of 2; q3 2 of 3 (u 7 < v 9 misses);
    # q4 0 of 2 (all length 4: ties miss); q5 1 of 1: 7 of 11 = 63.64 %. Exact: q2 (y, z tie in length
    # too) and q5: 40 %. 5-best is undefined off the rubric. Spearman: q1 lengths ranks [3, 1, 2] vs
    # [3, 2, 1] = 0.5; q2 1; q3 [2, 3, 1] vs [3, 2, 1] = 0.5; q4 undefined (constant); q5 1: mean 0.75.
    # Kendall: q1 (2 - 1) / 3; q2 1; q3 (2 - 1) / 3; q5 1: mean 2/3.
    assert report["ranked"]["length_baseline"] == {
        "prompts": 5, "pairs": 11, "pairwise_accuracy": 63.64, "five_best": None, "exact_match": 40.0,
        "spearman": 0.75, "kendall_tau": 0.6667}
    # Pairs: the judge agrees on the first only (a tie and a None are misses): 25 %; length agrees on the
    # first and third (equal lengths miss): 50 %.
    assert {k: v for k, v in report["pairs"]["judge"].items() if k != "seconds"} == {
        "pairs": 4, "pairwise_accuracy": 25.0, "parse_failures": 2}
    assert report["pairs"]["length_baseline"] == {"pairs": 4, "pairwise_accuracy": 50.0}


def test_ranked_metrics_do_not_depend_on_the_order_responses_are_listed():
    # Human ties used to be broken by list position: the same judgments, listed in another order,
    # changed exact match (q2 here) and 5-best (q4).
    scores = [[score for _, _, score, _ in rs] for _, rs in RANKED]
    ranks = [[rank for _, rank, _, _ in rs] for _, rs in RANKED]
    listed = ranked_metrics(scores, ranks)
    reversed_ = ranked_metrics([row[::-1] for row in scores], [row[::-1] for row in ranks])
    assert reversed_ == listed
    assert (listed["exact_match"], listed["five_best"]) == (40.0, 60.0)


def test_hh_rlhf_dialogues_split_at_the_last_assistant_turn(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a color\n\nAssistant: "
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"chosen": dialogue + "Blue.", "rejected": dialogue + "No."}) + "\n")
    (pair,) = load_pairs(path)
    assert pair.chosen == "Blue." and pair.rejected == "No."
    assert pair.instruction.endswith("Human: name a color") and "Assistant: hello" in pair.instruction


def test_length_baseline_on_real_oasst1_first_turns_beats_chance():
    prompts = load_ranked(OASST1_SAMPLE)
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
