"""The run directory: where every stage reads its inputs and writes its outputs.

    format.json                 {"format": 1, "selfreward": "0.1.0"}: the layout and record shapes below, and the release that wrote them
    recipe.yaml                 the resolved recipe this run started with
    m1/                         M1, the SFT model (a plain HF checkpoint)
    sft_log.jsonl               SFT's per-step training records             {step, loss, learning_rate, ...}
    iter{t}/prompts.jsonl       new instructions written by M_t           {id, instruction}
    iter{t}/responses.jsonl     N candidates per prompt                   {id, prompt_id, index, instruction, response, tokens}
    iter{t}/judgments.jsonl     k judgments per candidate                 {id, prompt_id, score, scores, judgments, parse_failures}
    iter{t}/pairs.jsonl         best vs worst per prompt, TRL columns     {id, prompt, chosen, rejected, ...}
    iter{t}/judge_eval.json     M_t as a judge against held-out human preferences (when the recipe asks)
    iter{t}/policy_eval.json    M_{t+1}'s implicit reward against M_t on held-out human pairs (when the recipe asks)
    iter{t}/model/              M_{t+1}, DPO-trained from M_t (a plain HF checkpoint)
    iter{t}/dpo_log.jsonl       DPO's per-step training records             {step, loss, rewards/chosen, ...}
    iter{t}/metrics.json        counts and timings of the iteration
    iter{t}/<file>.part-i-of-N.jsonl   one shard's part of a sharded stage's file (`selfreward merge` joins them)
    done/{stage}.json           written last, atomically: the stage finished; holds its result
    locks/{stage}.lock          held (flock) by the one process running that stage; names its host and pid

A stage is finished exactly when its `done/` record exists; outputs are complete before it is written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selfreward.errors import UserError, writing
from selfreward.process_tree import wait_for_earlier_processes
from selfreward.recipe import Recipe, first_difference, parse_recipe, recipe_yaml, value_at
from selfreward.run.jsonl import write_atomic, write_json_atomic
from selfreward.run.units import Shard

log = logging.getLogger(__name__)

# The layout of a run directory and the shape of its files and records. Bump it when either changes, with
# a note in DEVELOPERS.md; a directory of another version is refused, never read with today's schema.
# Directories written before the version existed are version 1.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def sft_model(self) -> Path:
        return self.root / "m1"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter{t}"

    def prompts(self, t: int) -> Path:
        return self.iteration(t) / "prompts.jsonl"

    def responses(self, t: int) -> Path:
        return self.iteration(t) / "responses.jsonl"

    def judgments(self, t: int) -> Path:
        return self.iteration(t) / "judgments.jsonl"

    def anchor_responses(self, t: int) -> Path:
        """pairs.anchor: the anchor model's candidates for iteration t's prompts (empty while it is M_t)."""
        return self.iteration(t) / "anchor_responses.jsonl"

    def anchor_judgments(self, t: int) -> Path:
        """pairs.anchor: M_t's judgments of the anchor's candidates."""
        return self.iteration(t) / "anchor_judgments.jsonl"

    def previous_judgments(self, t: int) -> Path:
        """dpo.consistency_weighting: M_{t-1}'s judgments of M_t's candidates (empty in iteration 1)."""
        return self.iteration(t) / "previous_judgments.jsonl"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs.jsonl"

    def meta_judgments(self, t: int) -> Path:
        """meta_judge: per prompt, the battles between judgments of its most disputed candidate and their Elo."""
        return self.iteration(t) / "meta_judgments.jsonl"

    def judge_pairs(self, t: int) -> Path:
        """meta_judge: judge-training pairs (best vs worst judgment by Elo), trained with the answer pairs."""
        return self.iteration(t) / "judge_pairs.jsonl"

    def judge_eval(self, t: int) -> Path:
        return self.iteration(t) / "judge_eval.json"

    def head_to_head(self, t: int) -> Path:
        """M_{t+1} vs M_t by a fixed judge; its answers beside it (head_to_head.<side>_outputs.json)."""
        return self.iteration(t) / "head_to_head.json"

    def policy_eval(self, t: int) -> Path:
        return self.iteration(t) / "policy_eval.json"

    def model(self, t: int) -> Path:
        """M_{t+1}: the model trained in iteration t."""
        return self.iteration(t) / "model"

    @property
    def sft_log(self) -> Path:
        """SFT's per-step training records (JSONL), kept after its checkpoint is deleted."""
        return self.root / "sft_log.jsonl"

    def dpo_log(self, t: int) -> Path:
        return self.iteration(t) / "dpo_log.jsonl"

    def metrics(self, t: int) -> Path:
        return self.iteration(t) / "metrics.json"

    def part(self, path: Path, shard: Shard) -> Path:
        """A shard's part of the run file `path`: iter1/responses.jsonl → iter1/responses.part-2-of-3.jsonl."""
        return path.with_name(f"{path.stem}.{shard.suffix}{path.suffix}")

    def part_counts(self, path: Path, key: str) -> set[int]:
        """The N of every part of the run file `path` (stage done key `key`) found on disk, from the part
        files and the parts' done records, so that a lone part still names N."""
        names = [p.stem for p in path.parent.glob(f"{path.stem}.*{path.suffix}")] + self.done_keys(f"{key}.")
        return {shard.count for name in names if (shard := Shard.named_in(name))}

    def _done_path(self, stage: str) -> Path:
        return self.root / "done" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self._done_path(stage).is_file()

    def done_record(self, stage: str) -> dict[str, Any] | None:
        path = self._done_path(stage)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def skip_if_done(self, stage: str) -> dict[str, Any] | None:
        """The stage's done record, saying in the log that it is skipped; None if it has not finished."""
        record = self.done_record(stage)
        if record is not None:
            log.info("%s: already done, skipping", stage)
        return record

    def mark_done(self, stage: str, result: dict[str, Any]) -> None:
        write_json_atomic(self._done_path(stage), result)

    def done_keys(self, prefix: str) -> list[str]:
        """Keys of the done records whose key starts with `prefix` (the parts of a sharded stage)."""
        folder = self.root / "done"
        return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.json")
                      if str(p.relative_to(folder)).startswith(prefix))

    def workers_lock(self, stage: str) -> Path:
        """Held shared by every process `stage` starts, as long as it lives (selfreward/process_tree.py)."""
        return self.root / "locks" / f"{stage}.workers"

    @contextmanager
    def hold(self, stage: str) -> Iterator[None]:
        """Run `stage` as its only writer, or refuse with one line naming the process that holds it.

        An OS lock (flock) dies with its process, so a holder killed by SIGKILL or a lost node never blocks
        the rerun; on Linux, flock over NFS is a byte-range lock that other nodes see as well. The processes
        an earlier holder started (training workers, replicas) die with it; the stage starts only once they
        are gone (`selfreward.process_tree`).
        """
        path = self.root / "locks" / f"{stage}.lock"
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise UserError(
                    f"{self.root}: '{stage}' is already being run by {holder}; wait for it to finish or stop "
                    "it, then rerun to resume"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            wait_for_earlier_processes(self.workers_lock(stage), stage)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @property
    def format_path(self) -> Path:
        return self.root / "format.json"

    def check_format(self) -> None:
        """Refuse a run directory of another format version (one line: which version, what to do); record
        the version in a directory that has none yet (new, or written before versions existed: version 1)."""
        from selfreward import __version__

        if self.format_path.exists():
            try:
                found = json.loads(self.format_path.read_text(encoding="utf-8"))
                version = found["format"]
            except (OSError, ValueError, TypeError, KeyError):
                raise UserError(f"{self.format_path}: damaged (expected {{\"format\": N, ...}}); if this run was started by "
                                f"selfreward {__version__}, write {{\"format\": {FORMAT_VERSION}}} into it") from None
            if version != FORMAT_VERSION:
                raise UserError(f"{self.root}: a run directory of format version {version} (written by selfreward "
                                f"{found.get('selfreward', '?')}); this selfreward {__version__} reads version {FORMAT_VERSION} only: "
                                "resume it with the release that started it, or start a new --output")
            return
        write_json_atomic(self.format_path, {"format": FORMAT_VERSION, "selfreward": __version__})

    def bind_recipe(self, recipe: Recipe) -> None:
        """Record the recipe on a new run; refuse a different recipe on an existing one, and a directory of
        another format version (`check_format`).

        Mixing outputs of two recipes in one directory would make every later figure meaningless, so a
        changed recipe must go to a new --output.
        """
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        self.check_format()
        text = recipe_yaml(recipe)
        if self.recipe_path.exists():
            old = parse_recipe(yaml.safe_load(self.recipe_path.read_text(encoding="utf-8")), str(self.recipe_path))
            before, now = old.model_dump(mode="json"), recipe.model_dump(mode="json")
            key = first_difference(before, now)
            if key:
                # Naming both values tells a user whose recipe only took a newer default what to set to resume.
                raise UserError(
                    f"{self.recipe_path}: this run was started with a different recipe ('{key}' differs: "
                    f"{json.dumps(value_at(before, key))} in this run, {json.dumps(value_at(now, key))} in the recipe); "
                    "set it as the run has it, use a new --output directory, or delete this one to start over"
                )
            return
        write_atomic(self.recipe_path, text)

    def model_for(self, t: int, recipe: Recipe) -> str:
        """M_t as a model reference: base for t=0, M1 = SFT model, M_{t>1} = model of iteration t-1."""
        if t <= 0:
            return recipe.model.base
        if t == 1:
            return str(self.sft_model) if recipe.sft.enabled else recipe.model.base
        return str(self.model(t - 1))
