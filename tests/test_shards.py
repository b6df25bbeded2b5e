"""A stage split into shards and merged writes, byte for byte, what the unsharded stage writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from selfreward.run.units import Shard
from tests.test_pipeline import tiny_recipe


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def prompted(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run directory) with iteration 1's prompts written by the tiny model: 7 prompts, units of 2,
    so that shards get unequal numbers of units and the last unit is short."""
    root = tmp_path_factory.mktemp("sharded")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        tiny_model, iterations=1, sft={"enabled": False}, prompts={"count": 7},
        responses={"unit_size": 2}, judge={"unit_size": 3},
    )))
    result = cli("prompts", "-r", recipe, "-o", root / "run", "-t", 1)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(RunDir(root / "run").prompts(1))) == 7
    return recipe, root / "run"


def sharded(recipe: Path, run: Path, command: str, count: int) -> None:
    for index in range(1, count + 1):
        result = cli(command, "-r", recipe, "-o", run, "-t", 1, "--shard", f"{index}/{count}")
        assert result.exit_code == 0, result.output
    result = cli("merge", "-r", recipe, "-o", run, "-t", 1, "--stage", command)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def unsharded(prompted, tmp_path_factory) -> RunDir:
    recipe, source = prompted
    run = RunDir(tmp_path_factory.mktemp("whole") / "run")
    shutil.copytree(source, run.root)
    for command in ("generate", "judge"):
        result = cli(command, "-r", recipe, "-o", run.root, "-t", 1)
        assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("count", [1, 2, 3, 6])  # 6 shards of 4 units: two shards get none
def test_sharded_and_merged_stages_equal_the_unsharded_stages_byte_for_byte_also_with_empty_shards(prompted, unsharded, tmp_path, count):
    recipe, source = prompted
    run = RunDir(tmp_path / "run")
    shutil.copytree(source, run.root)
    sharded(recipe, run.root, "generate", count)
    assert run.responses(1).read_bytes() == unsharded.responses(1).read_bytes()
    sharded(recipe, run.root, "judge", count)
    assert run.judgments(1).read_bytes() == unsharded.judgments(1).read_bytes()
    assert len(read_jsonl(run.judgments(1))) == 7 * 3
    for key in ("iter1/generate", "iter1/judge"):  # the same counts, wall time aside
        merged, whole = run.done_record(key), unsharded.done_record(key)
        assert {k: v for k, v in merged.items() if k not in ("seconds", "shards", "judged_now")} == \
               {k: v for k, v in whole.items() if k not in ("seconds", "judged_now")}
        assert merged["shards"] == count


def test_merge_names_the_missing_part_and_a_rerun_shard_resumes(prompted, unsharded, tmp_path):
    recipe, source = prompted
    run = RunDir(tmp_path / "run")
    shutil.copytree(source, run.root)
    assert cli("generate", "-r", recipe, "-o", run.root, "-t", 1, "--shard", "1/3").exit_code == 0
    result = cli("merge", "-r", recipe, "-o", run.root, "-t", 1, "--stage", "generate")
    assert result.exit_code == 2
    assert f"error: {run.root}: part 2/3 of stage 'iter1/generate' is missing; run `selfreward generate --iteration 1 --shard 2/3` first" in " ".join(result.output.split())
    assert not run.is_done("iter1/generate") and not run.responses(1).exists()
    # Part 2 cut short (its last unit lost, as by a kill): the rerun redoes only that unit.
    assert cli("generate", "-r", recipe, "-o", run.root, "-t", 1, "--shard", "2/3").exit_code == 0
    part = run.part(run.responses(1), Shard(2, 3))
    whole = part.read_bytes()
    part.write_bytes(b"".join(whole.splitlines(keepends=True)[:-4]))
    (run.root / "done" / "iter1" / "generate.part-2-of-3.json").unlink()
    result = cli("merge", "-r", recipe, "-o", run.root, "-t", 1, "--stage", "generate")
    assert result.exit_code == 2 and "part 2/3 of stage 'iter1/generate' is unfinished" in " ".join(result.output.split())
    assert cli("generate", "-r", recipe, "-o", run.root, "-t", 1, "--shard", "2/3").exit_code == 0
    assert part.read_bytes() == whole
    assert cli("generate", "-r", recipe, "-o", run.root, "-t", 1, "--shard", "3/3").exit_code == 0
    assert cli("merge", "-r", recipe, "-o", run.root, "-t", 1, "--stage", "generate").exit_code == 0
    assert run.responses(1).read_bytes() == unsharded.responses(1).read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--shard", "4/3"], "--shard: expected i/N with 1 <= i <= N, got '4/3'"),
    (["generate", "--shard", "x"], "--shard: expected i/N such as 2/3, got 'x'"),
    (["merge", "--stage", "pairs"], "merge: stage 'pairs' is not sharded (shardable: generate, judge, anchor-generate, anchor-judge, consistency-judge)"),
    (["merge", "--stage", "nope"], "--stage: unknown stage 'nope'"),
])
def test_bad_shard_arguments_are_one_line(prompted, tmp_path, args, message):
    recipe, source = prompted
    shutil.copytree(source, tmp_path / "run")
    result = cli(args[0], "-r", recipe, "-o", tmp_path / "run", "-t", 1, *args[1:])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


@pytest.mark.slow
def test_data_parallel_replicas_write_what_one_process_writes(prompted, unsharded, tmp_path):
    """backend.data_parallel_size: 2 runs each stage as 2 shard processes (own engine each) and joins them."""
    recipe, source = prompted
    raw = yaml.safe_load(recipe.read_text())
    raw["backend"]["data_parallel_size"] = 2
    replicated = tmp_path / "recipe.yaml"
    replicated.write_text(yaml.safe_dump(raw))
    run = RunDir(tmp_path / "run")
    shutil.copytree(source, run.root)
    (run.root / "recipe.yaml").unlink()  # the run is bound to the recipe that says 2 replicas
    for command in ("generate", "judge"):
        result = cli(command, "-r", replicated, "-o", run.root, "-t", 1)
        assert result.exit_code == 0, result.output
    assert run.responses(1).read_bytes() == unsharded.responses(1).read_bytes()
    assert run.judgments(1).read_bytes() == unsharded.judgments(1).read_bytes()
    assert run.done_record("iter1/generate")["shards"] == run.done_record("iter1/judge")["shards"] == 2
