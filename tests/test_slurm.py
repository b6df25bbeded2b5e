"""One iteration submitted through `selfreward slurm` to a real one-node SLURM cluster on this host: it ends
exactly like a local `selfreward iterate`, also when a job is requeued mid-stage; a failed stage stops the
chain, visibly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.run.directory import RunDir
from tests.conftest import ROOT, needs
from tests.slurm_cluster import Cluster, missing
from tests.test_kill import comparable
from tests.test_pipeline import tiny_recipe

pytestmark = pytest.mark.slow
# Figures that only say how the work was split or how long it took.
SPLIT = {"shards", "seconds", "judged_now"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing()
    needs(reason is None, str(reason))
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for sbatch, called by `selfreward slurm`
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def recipe_file(tiny_model: str, folder: Path, **changes) -> Path:
    # Expected-mode judging gives a random tiny model real scores, so there are pairs to train on.
    training = {"batch_size": 2, "save_steps": 1, "save_minutes": None}
    sections = {"judge": {"mode": "expected"}, "sft": training, "dpo": training}
    for key, values in changes.items():
        sections[key] = {**sections.get(key, {}), **values}
    raw = tiny_recipe(tiny_model, iterations=1, **sections)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def submit(recipe: Path, out: Path, *args: str) -> list[tuple[str, str]]:
    result = CliRunner().invoke(app, ["slurm", "-r", str(recipe), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    return [tuple(line.split("\t")[::-1]) for line in result.output.splitlines() if "\t" in line]


def local_run(recipe: Path, out: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "selfreward", "iterate", "-r", str(recipe), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr


def same_run(local: Path, cluster_run: Path) -> None:
    """Every file of the local run, record for record, in the cluster's run (which also holds its shard
    parts and job logs); counts alike but for how the work was split."""
    expected, actual = comparable(local), comparable(cluster_run)
    for name, value in expected.items():
        assert name in actual, name
        if name.endswith(".safetensors"):
            assert value.keys() == actual[name].keys()
            for key in value:
                assert value[key].equal(actual[name][key]), f"{name}: {key}"
        elif name.startswith("done/") or name.endswith("metrics.json"):
            strip = lambda d: {k: v for k, v in d.items() if k not in SPLIT}  # noqa: E731
            assert strip(actual[name]) == strip(value), name
        else:
            assert actual[name] == value, name


def test_one_iteration_as_slurm_jobs_ends_like_a_local_run(cluster, tiny_model, tmp_path):
    recipe = recipe_file(tiny_model, tmp_path)
    local_run(recipe, tmp_path / "local")
    jobs = submit(recipe, tmp_path / "cluster", "--shards", "2")
    assert [name for name, _ in jobs] == ["sft", "iter1-prompts", "iter1-generate", "iter1-generate-merge", "iter1-judge",
                                          "iter1-judge-merge", "iter1-pairs", "iter1-dpo", "report"]
    cluster.wait_idle(900)
    for name, job_id in jobs:
        assert cluster.job(job_id)["JobState"] == "COMPLETED", (name, cluster.job(job_id))
    run = RunDir(tmp_path / "cluster")
    assert run.done_record("iter1/generate")["shards"] == run.done_record("iter1/judge")["shards"] == 2
    same_run(tmp_path / "local", run.root)


def test_a_job_requeued_mid_training_resumes_and_the_run_ends_like_a_local_run(cluster, tiny_model, tmp_path):
    recipe = recipe_file(tiny_model, tmp_path, sft={"epochs": 3})  # 12 steps: time to requeue after the first
    local_run(recipe, tmp_path / "local")
    jobs = dict(submit(recipe, tmp_path / "cluster"))
    work = tmp_path / "cluster" / ".m1.work"
    deadline = time.time() + 300
    while not any((folder / "trainer_state.json").exists() for folder in work.glob("checkpoint-*")):
        assert time.time() < deadline, cluster.run("squeue")
        time.sleep(0.05)
    cluster.run("scontrol", "requeue", jobs["sft"])  # as a preemption does: the job is killed and queued again
    while cluster.job(jobs["sft"])["JobState"] not in ("PENDING", "REQUEUED"):
        time.sleep(0.2)
    # Requeued jobs wait 120 s to be eligible; 5 s is enough for slurmd to forget the killed instance (started
    # at once, it refuses the job: "Job credential revoked").
    cluster.run("scontrol", "update", f"jobid={jobs['sft']}", "StartTime=now+5")
    cluster.wait_idle(900)
    sft = cluster.job(jobs["sft"])
    assert sft["JobState"] == "COMPLETED" and int(sft["Restarts"]) == 1
    log = (tmp_path / "cluster" / "slurm" / "logs").glob("sft-*.out")
    assert "resuming training from" in next(log).read_text()
    same_run(tmp_path / "local", tmp_path / "cluster")


def test_a_failed_stage_stops_the_chain_and_says_why(cluster, tiny_model, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)  # whole files, but weights that do not fit the config: fails when loaded
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    recipe = recipe_file(tiny_model, tmp_path, sft={"enabled": False}, prompts={"model": str(broken)})
    jobs = submit(recipe, tmp_path / "cluster")
    cluster.wait_idle(300)
    states = {name: cluster.job(job_id)["JobState"] for name, job_id in jobs}
    assert states["iter1-prompts"] == "FAILED"
    assert {states[name] for name, _ in jobs[1:]} == {"CANCELLED"}, states  # never ran
    run = RunDir(tmp_path / "cluster")
    assert not run.prompts(1).exists() and not run.responses(1).exists() and not (run.root / "done").exists()
    log = next((run.root / "slurm" / "logs").glob("iter1-prompts-*.out")).read_text()
    assert f"error: model '{broken}': cannot load" in " ".join(log.split())
    assert json.loads((run.root / "slurm" / "jobs.json").read_text())[0]["name"] == "iter1-prompts"
