"""LLM-as-a-judge with the additive 5-point rubric of Yuan et al. (2024), usable on its own.

    from selfreward.backends import open_backend
    from selfreward.judge import Judge, JudgeItem
    judge = Judge(backend, samples=3)
    results = judge.score([JudgeItem("Name a prime.", "7 is prime.")])

- `parse`: the parse contract (`parse_score`, `parse_winner`);
- `hygiene`: judged text made inert (`neutralise`);
- `scoring`: `Judge` (sampled and expected modes, scores and direct pairwise comparison), its templates;
- `agreement`: how well a judge agrees with human preferences (`evaluate_judge`), beside a length baseline.
"""

from selfreward.judge.hygiene import Defence, control_tokens, neutralise
from selfreward.judge.parse import SCORE_STOPS, SCORES, WINNER_STOPS, parse_score, parse_winner
from selfreward.judge.scoring import (
    MODES,
    Judge,
    JudgeItem,
    JudgePair,
    JudgeResult,
    PairwiseResult,
    check_mode,
    load_judge_template,
    load_pairwise_template,
    make_judge,
    render_judge_prompt,
    render_pairwise_prompt,
    summarize,
)

__all__ = [
    "MODES", "SCORES", "SCORE_STOPS", "WINNER_STOPS", "Defence", "Judge", "JudgeItem", "JudgePair", "JudgeResult",
    "PairwiseResult", "check_mode", "control_tokens", "load_judge_template", "load_pairwise_template", "make_judge",
    "neutralise", "parse_score", "parse_winner", "render_judge_prompt", "render_pairwise_prompt", "summarize",
]
