"""The meta-judge stage: which answer's judgments it compares, how battles and Elo pick the judge pair, the
caps, and the loop training on judge pairs beside answer pairs."""

from __future__ import annotations

import random
import re

import pytest

from selfreward.backends.base import Completion
from selfreward.errors import UserError
from selfreward.recipe import parse_recipe
from selfreward.run.jsonl import read_jsonl
from selfreward.stages.meta_judge import elo, judge_pairs, most_disputed
from tests.conftest import ScriptedJudge, scripted_score


def test_the_most_disputed_candidate_is_the_one_whose_scores_spread_most():
    rng = random.Random(0)
    candidates = [{"id": "a", "scores": [3, 3, 3]}, {"id": "b", "scores": [1, 5, None]}, {"id": "c", "scores": [2, 4, 3]}]
    assert most_disputed(candidates, rng)["id"] == "b"
    assert most_disputed([{"id": "a", "scores": [3, 3]}, {"id": "b", "scores": [4, None]}], rng) is None


def test_elo_ranks_the_judgment_that_wins_its_battles_first():
    ratings = elo(3, [(2, 0), (2, 1), (1, 0)])
    assert ratings[2] > ratings[1] > ratings[0] and abs(sum(ratings) - 3000) < 1e-9
    assert elo(2, []) == [1000.0, 1000.0]


def records_and_items(count: int, winner: int = 2, loser: int = 0):
    records, items = [], {}
    for p in range(count):
        battles = [[winner, 1], [winner, loser], [1, loser]]
        records.append({"prompt_id": f"p{p}", "response_id": f"p{p}-r0", "scores": [1, 3, p % 3 + 3], "battles": battles,
                        "undecided": 0, "elo": elo(3, [tuple(b) for b in battles])})
        items[f"p{p}"] = {"instruction": f"task {p}", "response": "an answer", "judgments": [f"worst {p}", f"middle {p}", f"best {p}"]}
    return records, items


def test_judge_pairs_take_the_elo_best_and_worst_and_respect_length_share_and_score_caps():
    records, items = records_and_items(6)
    render = lambda item: f"judge this: {item['instruction']}"  # noqa: E731
    count = lambda prompt, answer: len((prompt + answer).split())  # noqa: E731
    pairs, dropped = judge_pairs(records, items, render, count, 100, answer_pairs=100, share=0.5, max_per_score=None, seed=0)
    assert len(pairs) == 6 and dropped == {"too_long_dropped": 0, "over_score_cap_dropped": 0, "over_share_dropped": 0}
    for pair in pairs:
        p = pair["id"].removesuffix("-judge")
        assert pair["chosen"][0]["content"] == f"best {p[1:]}" and pair["rejected"][0]["content"] == f"worst {p[1:]}"
        assert pair["prompt"][0]["content"] == f"judge this: task {p[1:]}" and pair["chosen_elo"] > pair["rejected_elo"]
    # Share: judge pairs are at most 15 % of everything DPO trains on: 17 answer pairs leave room for 3.
    pairs, dropped = judge_pairs(records, items, render, count, 100, answer_pairs=17, share=0.15, max_per_score=None, seed=0)
    assert len(pairs) == 3 and dropped["over_share_dropped"] == 3 and 3 / (17 + 3) <= 0.15
    # One pair per score of the chosen judgment (scores 3, 4, 5 twice each).
    pairs, dropped = judge_pairs(records, items, render, count, 100, answer_pairs=100, share=0.5, max_per_score=1, seed=0)
    assert sorted(p["chosen_score"] for p in pairs) == [3, 4, 5] and dropped["over_score_cap_dropped"] == 3
    # Longer than dpo.max_length tokens: counted and dropped.
    pairs, dropped = judge_pairs(records, items, render, count, 4, answer_pairs=100, share=0.5, max_per_score=None, seed=0)
    assert pairs == [] and dropped["too_long_dropped"] == 6


def test_the_meta_judge_is_refused_without_judgment_texts():
    with pytest.raises(UserError, match=r"meta_judge.enabled: the meta-judge compares judgment texts.*judge.mode: sampled"):
        parse_recipe({"judge": {"mode": "expected"}, "meta_judge": {"enabled": True}}, "r")
    with pytest.raises(UserError, match=r"meta_judge.enabled: needs judge.samples of 2 or more"):
        parse_recipe({"judge": {"samples": 1}, "meta_judge": {"enabled": True}}, "r")
    with pytest.raises(UserError, match=r"meta_judge\.share"):
        parse_recipe({"meta_judge": {"enabled": True, "share": 1.5}}, "r")


class MetaScripted(ScriptedJudge):
    """Judgments 'Reasoning of quality Q' with scripted scores; the meta-judge prefers the higher quality,
    in either order, so every battle is decided by content."""

    def generate(self, prompts, n, sampling):
        if prompts and "<evaluation_a>" in prompts[0]:
            found = [re.findall(r"quality (\d+)", p) for p in prompts]
            return [[Completion("Winner: A" if int(q[0]) > int(q[1]) else "Winner: B", 3, True)] for q in found]
        if prompts and "<response>" in prompts[0]:
            return [[Completion(f"Reasoning of quality {i}.\nScore: {scripted_score(p, i)}", 6, True) for i in range(n)] for p in prompts]
        return self.inner.generate(prompts, n, sampling)


def test_the_loop_trains_on_judge_pairs_whose_chosen_judgment_won_its_battles(tiny_model, tmp_path):
    from selfreward import loop
    from selfreward.backends import open_backend
    from selfreward.run.directory import RunDir
    from tests.test_pipeline import tiny_recipe

    recipe = parse_recipe(tiny_recipe(tiny_model, iterations=1, judge={"samples": 3},
                                      meta_judge={"enabled": True, "share": 0.45}, dpo={"max_length": 512}), "tiny")
    run = RunDir(tmp_path / "run")
    loop.run(recipe, run, lambda *args: MetaScripted(open_backend(*args)))
    records = read_jsonl(run.meta_judgments(1))
    judge_pairs_written = read_jsonl(run.judge_pairs(1))
    assert records and judge_pairs_written
    judgments = {j["id"]: j for j in read_jsonl(run.judgments(1))}
    for pair in judge_pairs_written:
        texts = judgments[pair["response_id"]]["judgments"]
        parsed = [t for t, s in zip(texts, judgments[pair["response_id"]]["scores"]) if s is not None]
        qualities = [int(re.search(r"quality (\d+)", t).group(1)) for t in parsed]
        # Every battle is decided by quality, so Elo puts the highest quality first and the lowest last.
        assert pair["chosen"][0]["content"] == parsed[qualities.index(max(qualities))]
        assert pair["rejected"][0]["content"] == parsed[qualities.index(min(qualities))]
        assert "<response>" in pair["prompt"][0]["content"]  # the judge prompt the judgments answered
    answer_pairs = len(read_jsonl(run.pairs(1)))
    assert len(judge_pairs_written) <= 0.45 * (answer_pairs + len(judge_pairs_written))
    meta = run.done_record("iter1/meta-judge")
    assert meta["verdicts_unparsed"] == 0 and meta["verdicts"] == 2 * (meta["battles_decided"] + meta["battles_undecided"])
    assert all(len(r["verdicts"]) == len(r["battles"]) + r["undecided"] for r in records)
    done = run.done_record("iter1/dpo")
    assert done["judge_pairs"] == len(judge_pairs_written) and done["pairs"] == answer_pairs + len(judge_pairs_written)
