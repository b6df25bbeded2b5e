"""Length limits on text read from files: over-long instructions and responses are cut, and counted.

One seed example or judged response far longer than the rest sets the padded length, and the memory,
of every batch it lands in, and can overflow the model's context. Cutting it keeps the run going; the
count (logged, and kept in the stage's result) says how much of the data was affected.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# A cut moves back to the last whitespace so that no word is split, unless that whitespace is further
# back than this share of the limit (a long URL or code without spaces is cut where it stands).
WORD_SLACK = 0.2


def truncate_text(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else a prefix of at most `limit` characters,
    ending before a word that the limit would split when there is whitespace near the limit."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    if text[limit].isspace():
        return head
    boundary = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:boundary] if boundary >= limit * (1 - WORD_SLACK) else head


def truncate(records: list[dict[str, Any]], field: str, limit: int, what: str) -> tuple[list[dict[str, Any]], int]:
    """Records with `field` cut to `limit` characters (changed ones copied), and how many were cut."""
    kept, count = [], 0
    for record in records:
        if len(record[field]) > limit:
            record = {**record, field: truncate_text(record[field], limit)}
            count += 1
        kept.append(record)
    if count:
        log.warning("truncated %d of %d %s to %d characters", count, len(records), what, limit)
    return kept, count


def limit_lengths(
    records: list[dict[str, Any]], max_instruction: int, max_response: int, what: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Cut the `instruction` and `response` of {instruction, response, ...} records; counts per field."""
    records, instructions = truncate(records, "instruction", max_instruction, f"{what} instructions")
    records, responses = truncate(records, "response", max_response, f"{what} responses")
    return records, {"instructions": instructions, "responses": responses}


def count_over(records: list[dict[str, Any]], max_instruction: int, max_response: int) -> dict[str, int]:
    """How many records `limit_lengths` would cut, per field (without cutting or logging)."""
    return {"instructions": sum(len(r["instruction"]) > max_instruction for r in records),
            "responses": sum(len(r["response"]) > max_response for r in records)}
