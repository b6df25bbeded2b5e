"""Seed data: our JSONL files, and OpenAssistant oasst1 converted the way the paper did.

IFT record: {id, instruction, response}. EFT record: {id, instruction, response, judgment, score}, where
`judgment` is the judge's target output, ending in `Score: N`.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from selfreward.data.limits import limit_lengths
from selfreward.errors import UserError
from selfreward.judge import parse_score
from selfreward.run.jsonl import read_jsonl

IFT_FIELDS = {"id": str, "instruction": str, "response": str}
EFT_FIELDS = {**IFT_FIELDS, "judgment": str, "score": int}


def load_ift(path: str | Path) -> list[dict[str, Any]]:
    return unique_ids(read_jsonl(path, IFT_FIELDS), path)


def load_eft(path: str | Path) -> list[dict[str, Any]]:
    records = unique_ids(read_jsonl(path, EFT_FIELDS), path)
    for record in records:
        if parse_score(record["judgment"]) != record["score"]:
            raise UserError(f"{path}: record '{record['id']}': judgment does not end in 'Score: {record['score']}'")
    return records


def unique_ids(records: list[dict], path: str | Path) -> list[dict]:
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise UserError(f"{path}: duplicate id '{record['id']}'")
        seen.add(record["id"])
    return records


def subsample(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(records) <= limit:
        return records
    return random.Random(seed).sample(records, limit)


def is_local(source: str) -> bool:
    """Whether a data source names a local file or folder rather than a hub dataset id."""
    return Path(source).expanduser().exists() or Path(source).suffix in {".jsonl", ".json", ".parquet", ".gz"} or source.startswith((".", "/", "~"))


def load_oasst1_messages(source: str, split: str = "train", what: str = "data.oasst1") -> list[dict[str, Any]]:
    """oasst1 messages from a hub id or local files (JSONL, JSON or parquet), via `datasets`; `what` names
    the source in an error."""
    import datasets

    path = Path(source)
    try:
        if path.exists():
            files = sorted(str(p) for p in path.glob("*") if p.suffix in {".jsonl", ".json", ".parquet", ".gz"}) if path.is_dir() else [str(path)]
            kind = "parquet" if files and files[0].endswith(".parquet") else "json"
            dataset = datasets.load_dataset(kind, data_files=files, split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UserError(f"{what}: cannot load '{source}' ({str(error).splitlines()[0]})") from None
    return list(dataset)


def usable(message: dict) -> bool:
    return not message.get("deleted") and message.get("review_result") is not False


def oasst1_first_turns(messages: list[dict], lang: str = "en") -> list[tuple[dict, list[dict]]]:
    """(root prompt, its ranked assistant replies best first) for each usable English first turn."""
    roots = {m["message_id"]: m for m in messages if m.get("parent_id") is None and m.get("role") == "prompter"
             and m.get("lang") == lang and usable(m)}
    replies: dict[str, list[dict]] = {}
    for m in messages:
        if m.get("parent_id") in roots and m.get("role") == "assistant" and usable(m) and m.get("rank") is not None:
            replies.setdefault(m["parent_id"], []).append(m)
    return [(roots[k], sorted(v, key=lambda m: m["rank"])) for k, v in replies.items()]


def rank_to_score(rank: int, replies: int) -> int:
    """Fast EFT targets: spread human ranks over 5 (best) down to 2 (worst of four or more)."""
    return max(2, 5 - round(3 * rank / max(1, replies - 1))) if replies > 1 else 4


def rank_judgment(rank: int, replies: int, score: int) -> str:
    position = "the best" if rank == 0 else "the weakest" if rank == replies - 1 else f"number {rank + 1}"
    return (
        f"People who compared {replies} answers to this instruction rated this one {position}. "
        f"It earns {score} of the 5 points on the rubric.\nScore: {score}"
    )


def tree_part(tree_id: str, trees) -> str:
    """"ift", "eft" or "heldout": the part of the split `trees` (shares) that a message tree belongs to, from a
    hash of its id (the same on every machine and run, whatever else the data holds)."""
    u = int.from_bytes(hashlib.sha256(tree_id.encode()).digest()[:8], "big") / 2**64
    return "ift" if u < trees.ift else "eft" if u < trees.ift + trees.eft else "heldout"


def oasst1_seeds(messages: list[dict], trees=None) -> tuple[list[dict], list[dict]]:
    """IFT from the best-ranked reply of each first turn; EFT from every ranked reply (scores from rank).
    `trees` (shares, recipe `data.oasst1_trees`): each message tree feeds IFT, EFT or neither."""
    ift, eft = [], []
    for root, ranked in oasst1_first_turns(messages):
        part = tree_part(root.get("message_tree_id") or root["message_id"], trees) if trees else None
        best = ranked[0]
        if part in (None, "ift") and best["rank"] == 0:
            ift.append({"id": root["message_id"], "instruction": root["text"], "response": best["text"]})
        if len(ranked) < 2 or part not in (None, "eft"):
            continue
        for reply in ranked:
            score = rank_to_score(reply["rank"], len(ranked))
            eft.append({"id": reply["message_id"], "instruction": root["text"], "response": reply["text"],
                        "judgment": rank_judgment(reply["rank"], len(ranked), score), "score": score,
                        "rank": reply["rank"], "prompt_id": root["message_id"]})
    return ift, eft


def load_seeds(data, seed: int, limits) -> tuple[list[dict], list[dict], dict[str, int]]:
    """IFT and EFT seed records from the recipe's data section, over-long text cut to the recipe's
    `limits`, and how many fields were cut ({ift,eft}_{instructions,responses})."""
    ift = load_ift(data.ift) if data.ift else []
    eft = load_eft(data.eft) if data.eft else []
    if data.oasst1:
        more_ift, more_eft = oasst1_seeds(load_oasst1_messages(data.oasst1, data.oasst1_split), data.oasst1_trees)
        ift, eft = ift + more_ift, eft + more_eft
    long = 0
    if data.max_ift_response_chars and ift:
        kept = [r for r in ift if len(r["response"]) <= data.max_ift_response_chars]
        long = len(ift) - len(kept)
        if not kept:
            raise UserError(f"data.max_ift_response_chars: every one of the {len(ift)} IFT responses is longer than "
                            f"{data.max_ift_response_chars} characters; raise it")
        ift = kept
    if not ift:
        raise UserError("data: no IFT seed examples (set data.ift or data.oasst1)")
    # Cut after subsampling, so the counts are of the examples used.
    ift, ift_cut = cut_to_limits(subsample(ift, data.max_ift, seed), limits, "IFT")
    eft, eft_cut = cut_to_limits(subsample(eft, data.max_eft, seed), limits, "EFT")
    return ift, eft, {**ift_cut, **eft_cut, **({"ift_responses_over_max_chars": long} if data.max_ift_response_chars else {})}


def normal(instruction: str) -> str:
    """How instructions are compared to find seed instructions among held-out ones: without case and outer whitespace."""
    return instruction.strip().lower()


def unseen(items: list, exclude: frozenset[str], text=lambda item: item.instruction) -> tuple[list, int]:
    """The items whose instruction (`text(item)`, compared in `normal` form) is not in `exclude`, and how many
    were left out."""
    kept = [item for item in items if normal(text(item)) not in exclude]
    return kept, len(items) - len(kept)


def seed_instructions(data, seed: int, limits) -> frozenset[str]:
    """Every seed instruction (`normal`), also those a max_ift / max_eft subsample or the response-length
    filter left out: evaluation sets leave them out."""
    ift, eft, _ = load_seeds(data.model_copy(update={"max_ift": None, "max_eft": None, "max_ift_response_chars": None}), seed, limits)
    return frozenset(normal(r["instruction"]) for r in ift + eft)


def cut_to_limits(records: list[dict], limits, what: str) -> tuple[list[dict], dict[str, int]]:
    """Instructions and responses cut to the recipe's limits; an EFT judgment never is (it ends in the score)."""
    records, counts = limit_lengths(records, limits.max_instruction_chars, limits.max_response_chars, what)
    return records, {f"{what.lower()}_{field}": n for field, n in counts.items()}


def orders_as_humans(scores: list[int], ranks: tuple[int, ...]) -> bool:
    """True when every response humans ranked better gets a strictly higher score."""
    return all(scores[i] > scores[j] for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


def judged_eft(judge, prompts: list) -> tuple[list[dict], int]:
    """The paper's EFT targets: judgments sampled from the IFT-trained model, kept for a prompt only when
    one sample's scores order all its responses as the humans ranked them. Returns (records, prompts kept).

    `prompts` are `evaluation.RankedPrompt`s; sample s of every response of a prompt forms one candidate set.
    """
    from selfreward.judge import JudgeItem

    results = judge.score_all([JudgeItem(p.instruction, r) for p in prompts for r in p.responses], "EFT judgments")
    records, kept, position = [], 0, 0
    for prompt in prompts:
        group = results[position : position + len(prompt.responses)]
        position += len(prompt.responses)
        for sample in range(judge.samples):
            scores = [r.scores[sample] if sample < len(r.scores) else None for r in group]
            if None in scores or not orders_as_humans(scores, prompt.ranks):
                continue
            kept += 1
            records += [
                {"id": f"{prompt.id}-{j}", "instruction": prompt.instruction, "response": text,
                 "judgment": group[j].texts[sample], "score": scores[j]}
                for j, text in enumerate(prompt.responses)
            ]
            break
    return records, kept
