"""The judge's parse contract: the score (or pairwise verdict) a judge's output gives, or None.

The score is the number after the last `Score:` label in the judge's output. The label is case-insensitive
and may carry markdown emphasis (`**Score:** 4`, `**Score: 4**`); an optional `/5` or `out of 5`, trailing
punctuation, whitespace and invisible characters (zero-width space, BOM) are tolerated. The number must be
a whole number from 0 to 5; anything else (6, 3.5, 45, words, nothing) makes the output unparseable: None,
counted by callers as a parse failure, never an exception. Only the judge's output is parsed, never the
response being judged. The pairwise verdict is the letter A or B after the last `Winner:` label.
"""

from __future__ import annotations

import re

SCORES = range(6)
# Sampled judgments stop at the first `Score: N` (N in 0-5): whatever follows only costs time, and small
# models tend to ramble on and bury a valid score under a broken one (the last label counts).
SCORE_STOPS = tuple(f"Score: {s}" for s in SCORES)
# Zero-width characters, BOM, soft hyphen and the bidirectional marks that copy-pasted text carries.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f\u061c"))
LABEL = re.compile(r"(?<![a-z])score[*_]*\s*:", re.IGNORECASE)
VALUE = re.compile(
    r"[\s*_]*(?P<number>[0-9]+(?:[.,][0-9]+)?)[\s*_]*(?:/\s*5|out\s+of\s+5)?[\s*_]*[.!;,)\]]*[\s*_]*(?:\n|\Z)",
    re.IGNORECASE,
)
WINNER_LABEL = re.compile(r"(?<![a-z])winner[*_]*\s*:", re.IGNORECASE)
WINNER_VALUE = re.compile(
    r"[\s*_]*(?:response[\s_]*)?(?P<letter>[ab])(?![a-z0-9])[\s*_]*[.!;,)\]]*[\s*_]*(?:\n|\Z)", re.IGNORECASE
)
WINNER_STOPS = ("Winner: A", "Winner: B")


def _after_last_label(text: str, label: re.Pattern[str], value: re.Pattern[str]) -> re.Match[str] | None:
    """`value` matched right after the last `label` in `text` (invisible characters ignored), else None."""
    text = text.translate(INVISIBLE)
    labels = list(label.finditer(text))
    return value.match(text, labels[-1].end()) if labels else None


def parse_score(text: str) -> int | None:
    """The judge's score: the whole number 0-5 after the last `Score:` label, else None."""
    match = _after_last_label(text, LABEL, VALUE)
    if match is None:
        return None
    # One ASCII digit: never int() a long run of digits (Python refuses over 4,300 of them).
    number = match.group("number")
    return int(number) if len(number) == 1 and int(number) in SCORES else None


def parse_winner(text: str) -> str | None:
    """The pairwise verdict: "A" or "B" after the last `Winner:` label, else None (never an exception)."""
    match = _after_last_label(text, WINNER_LABEL, WINNER_VALUE)
    return match.group("letter").upper() if match else None
