"""Work units: how a stage's work is cut, seeded, resumed and sharded.

A stage cuts its items (prompts to answer, responses to judge) into consecutive units of a size the recipe
fixes. Each unit is sampled with its own seed, derived from (recipe seed, stage, iteration, the unit's first
id), and its records reach the disk together. What a unit writes therefore depends only on the recipe and
the unit, never on how the work happened to be split: one process, a kill and a rerun, or N shards all
write the same records in the same order.

Where a backend cannot give each item its own random stream (transformers' `generate` draws for the whole
batch), the unit is the batch: its results depend on which items share it, which the recipe fixes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selfreward.errors import UserError
from selfreward.run.jsonl import read_jsonl, repair_tail, write_jsonl_atomic

T = TypeVar("T")


def unit_seed(seed: int, stage: str, iteration: int, first_id: str) -> int:
    """A 31-bit seed for one unit of work, the same in every process that runs that unit."""
    digest = hashlib.sha256(f"{seed}:{stage}:{iteration}:{first_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def units_of(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive units of `size` items (the last one may be shorter)."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


# `Shard.suffix` read back.
_SUFFIX = re.compile(r"\.part-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` (1-based, as written on the command line: --shard 2/3)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--shard: expected i/N such as 2/3, got '{text}'") from None
        if count < 1 or not 1 <= index <= count:
            raise UserError(f"--shard: expected i/N with 1 <= i <= N, got '{text}'")
        return cls(index, count)

    @property
    def suffix(self) -> str:
        """What names this shard's part files and done records: `part-2-of-3`."""
        return f"part-{self.index}-of-{self.count}"

    @classmethod
    def named_in(cls, name: str) -> Shard | None:
        """The shard whose suffix ends `name` (a part file's stem, a done key), else None."""
        match = _SUFFIX.search(name)
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    def take(self, units: Sequence[T]) -> list[T]:
        """This shard's units: a contiguous block, so that parts concatenated in order give the whole."""
        start = (self.index - 1) * len(units) // self.count
        end = self.index * len(units) // self.count
        return list(units[start:end])


def resume_units(output: Path, units: Sequence[Sequence[dict[str, Any]]], key: str, per_item: int = 1) -> int:
    """How many leading units `output` already holds complete; anything after them is removed.

    `key` names the record field holding an item's id, `per_item` how many records an item has (the N
    candidates of a prompt). A unit cut short by a crash, or records that belong to no expected unit, are
    dropped with an atomic rewrite, so that the stage redoes that unit whole and the file stays in unit order.
    """
    if not output.exists():
        return 0
    repair_tail(output)
    records = read_jsonl(output)
    kept = done = 0
    for unit in units:
        size = len(unit) * per_item
        ids = [str(item["id"]) for item in unit for _ in range(per_item)]
        found = [str(record[key]) for record in records[kept : kept + size]]
        if found != ids:
            break
        kept += size
        done += 1
    if kept != len(records):
        write_jsonl_atomic(output, records[:kept])
    return done
