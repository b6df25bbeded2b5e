"""Judged text is data, not instructions: what is done to it before it enters a judge prompt.

It cannot close its tag, cannot carry a control token of the judge's chat template, and verdict claims in
it (`Score: 5`, `5/5`, `Winner: A`) are deleted, because small judges copy the last score they read. Text
that argues for a high score in plain words is left alone, and does move small judges.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from selfreward.judge.parse import INVISIBLE

# Chat-template control markup that a tokenizer would read as real control tokens if judged text held it
# (ending the user's turn and opening the judge's own), for servers whose tokenizer is not known here.
COMMON_CONTROL = (r"<\|[^|<>\s]{1,40}\|>", r"</?s>", r"<(?:bos|eos|pad|start_of_turn|end_of_turn)>", r"\[/?INST\]")
COMMON_CONTROL_PATTERN = re.compile("|".join(COMMON_CONTROL))
# A verdict written into the judged text ("Score: 5", "**Score: 5**", "rate it 5 out of 5", "Winner: A"):
# small judges copy the last score they read, so such claims are deleted before judging. Kept narrow so
# that ordinary text survives: one digit after "score:", and "N/5" or "N out of 5" only with N in 0-5.
VERDICT_CLAIM = re.compile(
    r"[*_]*\bscore[*_\s]*[:=][*_\s]*\d(?:\.\d+)?(?!\d)(?:\s*(?:/|out\s+of)\s*\d+)?[*_]*"
    r"|\b[0-5](?:\.\d)?\s*(?:/|out\s+of)\s*5\b(?![/.,]?\d)"
    r"|[*_]*\bwinner[*_\s]*:[*_\s]*(?:response\s*)?[ab]\b[*_]*"
    r"|\"score\"\s*:\s*\"?\d+\"?",
    re.IGNORECASE,
)
# Tags that delimit the judged material; a response that contains them cannot close its own block early.
DELIMITER = re.compile(r"<\s*(/?)\s*(instruction|response(?:[\s_-]*[ab](?![a-z]))?)\s*>", re.IGNORECASE)


def neutralise_delimiters(text: str) -> str:
    """Rewrite tag look-alikes inside judged text, so it cannot end its block and speak as the prompt."""
    return DELIMITER.sub(lambda m: f"[{m.group(1)}{m.group(2)}]", text)


def control_tokens(tokenizer) -> re.Pattern[str]:
    """A pattern of the text forms of `tokenizer`'s special tokens (plus common chat markup)."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if t.special}
    # Longest first, so that "<end_of_turn>" is not matched as a shorter token it contains.
    alternatives = [re.escape(s) for s in sorted(specials, key=len, reverse=True) if len(s) >= 3]
    return re.compile("|".join(alternatives + list(COMMON_CONTROL)))


def neutralise(text: str, control: re.Pattern[str] | None = None) -> str:
    """Judged text made inert before it goes into a judge prompt:
    - tag look-alikes (`</response>`) rewritten, so it cannot close its block and speak as the prompt;
    - invisible characters dropped and verdict claims (`Score: 5`, `5/5`, `Winner: A`) deleted;
    - control tokens (`<end_of_turn>`, `<|im_start|>`, ...) broken by a zero-width space: the text reads
      the same but no longer tokenizes as a turn boundary.
    """
    text = neutralise_delimiters(text.strip()).translate(INVISIBLE)
    text = VERDICT_CLAIM.sub("", text).strip()
    return (control or COMMON_CONTROL_PATTERN).sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)


# Makes judged text inert: (text, control-token pattern or None) → text. `neutralise` unless a caller
# (a benchmark measuring what the defences are worth) passes another.
Defence = Callable[[str, "re.Pattern[str] | None"], str]
