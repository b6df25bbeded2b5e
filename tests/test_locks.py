"""One writer at a time: a second process on a held stage gets one line naming the holder and exit 2;
a holder that died (SIGKILL) blocks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_jsonl
from tests.conftest import ROOT
from tests.test_pipeline import tiny_recipe

HOLDER = """
import sys, time
from pathlib import Path
from selfreward.run.directory import RunDir
with RunDir(Path(sys.argv[1])).hold(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(run: RunDir, key: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run.root), key], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_stage_refuses_a_second_process_and_a_dead_holder_blocks_nothing(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, iterations=1, sft={"enabled": False})))
    run = RunDir(tmp_path / "run")
    holder = hold_in_another_process(run, "iter1/prompts")
    try:
        result = CliRunner().invoke(app, ["prompts", "-r", str(recipe), "-o", str(run.root), "-t", "1"])
        assert result.exit_code == 2
        (line,) = [line for line in result.output.splitlines() if line.strip()]
        assert f"'iter1/prompts' is already being run by host {socket.gethostname()} pid {holder.pid}" in line
        assert not run.prompts(1).exists() and not run.is_done("iter1/prompts")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = CliRunner().invoke(app, ["prompts", "-r", str(recipe), "-o", str(run.root), "-t", "1"])
    assert result.exit_code == 0, result.output
    assert run.is_done("iter1/prompts")


def test_two_iterate_processes_on_one_run_directory_leave_one_writer_and_no_duplicates(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, iterations=1)))
    command = [sys.executable, str(ROOT / "tests" / "crash_runner.py"), "iterate", "-r", str(recipe), "-o", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "run" / "locks" / "iterate.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert second.returncode == 2
    assert f"'iterate' is already being run by host {socket.gethostname()} pid {first.pid}" in " ".join(second.stderr.split())
    run = RunDir(tmp_path / "run")
    ids = [record["id"] for record in read_jsonl(run.prompts(1))]
    assert len(ids) == len(set(ids)) == 6
