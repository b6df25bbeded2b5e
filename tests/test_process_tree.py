"""One process tree per stage: SIGKILL the parent while 2-process training or 2 data-parallel replicas work,
and no process of it is alive 10 s later; the rerun ends with the weights or records of an uninterrupted
run; and a stage never starts while a process of an earlier run of it still holds its worker lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from selfreward.errors import UserError
from selfreward.process_tree import wait_for_earlier_processes
from selfreward.run.directory import RunDir
from tests.conftest import ROOT
from tests.test_pipeline import tiny_recipe


def processes_naming(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line contains `marker`, this test's own aside."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in command and state != "Z":
            found.append(int(entry.name))
    return found


def selfreward(*args, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfreward", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **options)


def kill_when(process: subprocess.Popen, ready, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit} s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def none_left_after(marker: str, seconds: float = 10) -> list[int]:
    time.sleep(seconds)
    return processes_naming(marker)


def test_a_rerun_waits_for_the_processes_of_an_earlier_run_then_one_line(tmp_path):
    lock = tmp_path / "sft.workers"
    # An orphan of an earlier run: holds the worker lock shared, as `join_stage` does.
    orphan = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
                               "print('held', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"sft\.workers: processes of an earlier run of 'sft' are still working after 1 s; "
                                            r"stop them \(`fuser -k .*sft\.workers`\), then rerun"):
            wait_for_earlier_processes(lock, "sft", timeout=1.0)
    finally:
        orphan.kill()
        orphan.wait()
    wait_for_earlier_processes(lock, "sft", timeout=1.0)  # gone: the stage starts


@pytest.mark.slow
def test_sigkill_during_two_process_training_leaves_no_worker_and_the_rerun_trains_what_an_uninterrupted_run_does(tiny_model, tmp_path):
    training = {"batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 1, "save_minutes": None, "epochs": 3,
                "group_by_length": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, iterations=1, sft=training,
                                                 launcher={"num_processes": 2, "main_process_port": 29655})))
    whole = tmp_path / "whole"
    done = selfreward("sft", "-r", recipe, "-o", whole)
    assert done.wait() == 0, done.stderr.read()[-3000:]

    run = tmp_path / "killed"
    work = run / ".m1.work"
    process = selfreward("sft", "-r", recipe, "-o", run)
    # Both workers up and the first checkpoint written: training is under way.
    # accelerate launch and its two workers (all three name the worker module).
    kill_when(process, lambda: len(processes_naming(f"selfreward.stages.worker sft {run}")) >= 3 and any(work.glob("checkpoint-*/trainer_state.json")),
              "two training workers and a checkpoint")
    assert none_left_after(str(run)) == []  # accelerate launch and both workers died with their parent
    rerun = selfreward("sft", "-r", recipe, "-o", run)
    assert rerun.wait() == 0, rerun.stderr.read()[-3000:]
    mine, theirs = load_file(str(run / "m1" / "model.safetensors")), load_file(str(whole / "m1" / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert (mine[name] - theirs[name]).abs().max() < 1e-5, name
    assert RunDir(run).done_record("sft")["steps"] == RunDir(whole).done_record("sft")["steps"]


@pytest.mark.slow
def test_sigkill_during_data_parallel_generation_leaves_no_replica_and_the_rerun_writes_the_same_records(tiny_model, tmp_path):
    from tests.test_shards import cli

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(tiny_model, iterations=1, sft={"enabled": False}, prompts={"count": 7}, responses={"unit_size": 2},
                      backend={"data_parallel_size": 2})
    recipe.write_text(yaml.safe_dump(raw))
    whole = RunDir(tmp_path / "whole")
    for command in ("prompts", "generate"):
        result = cli(command, "-r", recipe, "-o", whole.root, "-t", 1)
        assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "killed")
    run.root.mkdir()
    shutil.copytree(whole.root, run.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("responses*", "generate*", "locks"))
    process = selfreward("generate", "-r", recipe, "-o", run.root, "-t", 1)
    kill_when(process, lambda: len(processes_naming(f"--output {run.root} --iteration 1 --shard")) == 2, "two replicas")
    assert none_left_after(str(run.root)) == []
    rerun = selfreward("generate", "-r", recipe, "-o", run.root, "-t", 1)
    assert rerun.wait() == 0, rerun.stderr.read()[-3000:]
    mine, theirs = run.responses(1).read_text().splitlines(), whole.responses(1).read_text().splitlines()
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    assert mine == theirs, f"{len(mine)} vs {len(theirs)} records; first difference at {first}: {mine[first] if first is not None else ''} " \
                           f"vs {theirs[first] if first is not None else ''}"
