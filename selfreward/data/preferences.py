"""Human preference data that judges are measured against: ranked responses and chosen/rejected pairs.

- ranked: several responses per instruction with a human rank (0 = best): our JSONL
  `{id, instruction, responses: [{text, rank}]}`, or oasst1 message rows (its first turns);
- pairs: `{prompt|instruction, chosen, rejected}`, or hh-rlhf dialogues; `.jsonl` or `.jsonl.gz`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfreward.data.seeds import load_oasst1_messages, oasst1_first_turns
from selfreward.errors import UserError
from selfreward.run.jsonl import read_jsonl


@dataclass(frozen=True)
class RankedPrompt:
    id: str
    instruction: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]  # 0 = best


@dataclass(frozen=True)
class PreferencePair:
    id: str
    instruction: str
    chosen: str
    rejected: str


def load_ranked(path: str | Path) -> list[RankedPrompt]:
    """Ranked responses: our format {id, instruction, responses: [{text, rank}]}, or oasst1 message rows (a
    JSONL file, or anything `data.oasst1` takes: a hub id, parquet files)."""
    records = read_jsonl(path) if Path(path).suffix in {".jsonl", ".gz"} else load_oasst1_messages(str(path), "train", "ranked responses")
    if records and "message_id" in records[0]:
        return [
            RankedPrompt(root["message_id"], root["text"], tuple(r["text"] for r in replies), tuple(r["rank"] for r in replies))
            for root, replies in oasst1_first_turns(records) if len(replies) >= 2
        ]
    prompts = []
    for number, record in enumerate(records, start=1):
        responses = record.get("responses")
        if not isinstance(record.get("instruction"), str) or not isinstance(responses, list) or len(responses) < 2 or not all(
            isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("rank"), int) for r in responses
        ):
            raise UserError(f"{path}:{number}: expected {{instruction, responses: [{{text, rank}}, ...]}} with 2+ responses")
        prompts.append(RankedPrompt(str(record.get("id", number)), record["instruction"],
                                    tuple(r["text"] for r in responses), tuple(r["rank"] for r in responses)))
    return prompts


def split_dialogue(text: str) -> tuple[str, str]:
    """hh-rlhf dialogue → (conversation before the last assistant turn, that turn)."""
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut < 0:
        return "", text.strip()
    return text[:cut].strip(), text[cut + len(marker):].strip()


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Chosen/rejected pairs: {prompt|instruction, chosen, rejected}, or hh-rlhf dialogues (.jsonl or .jsonl.gz)."""
    pairs = []
    for number, record in enumerate(read_jsonl(path), start=1):
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise UserError(f"{path}:{number}: expected string fields 'chosen' and 'rejected'")
        instruction = record.get("prompt") or record.get("instruction")
        if isinstance(instruction, str):
            pairs.append(PreferencePair(str(record.get("id", number)), instruction, chosen, rejected))
            continue
        context, chosen_turn = split_dialogue(chosen)
        _, rejected_turn = split_dialogue(rejected)
        pairs.append(PreferencePair(str(record.get("id", number)), context, chosen_turn, rejected_turn))
    return pairs
