"""The Dockerfile, the Kubernetes manifests and the SLURM job scripts: linted, validated, and every command
they run exists in the CLI with those flags; the image installs what the README installs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from tests.conftest import ROOT
from tests.test_pipeline import tiny_recipe

K8S = sorted((ROOT / "selfreward" / "deploy" / "k8s").glob("*.yaml"))
KUBERNETES = "1.30.0"


def tool(name: str) -> str:
    """A checker installed with the test extra (next to this interpreter); its absence is a broken install."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: it comes with pip install '.[test]'"
    return found


def test_hadolint_passes_the_dockerfile():
    done = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_kubernetes_manifest_is_valid_for_a_stated_version():
    done = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, *map(str, K8S)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(K8S)


def cli_accepts(argv: list[str]) -> None:
    """The command exists and takes these options (--help stops before anything runs; an unknown option or
    command is still refused)."""
    result = CliRunner().invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"


def k8s_commands() -> list[list[str]]:
    commands = []
    for path in K8S:
        document = yaml.safe_load(path.read_text())
        if document["kind"] != "Job":
            continue
        (container,) = document["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
        if "command" in container:  # sh -c 'exec selfreward "$0" ... --shard ...' with the stage as $0
            script = container["command"][2].replace('"$0"', args[0]).replace("$((JOB_COMPLETION_INDEX + 1))", "1")
            script = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], script)
            argv = shlex.split(script)
            assert argv[:2] == ["exec", "selfreward"], script
            assert document["spec"]["completions"] == int(env["SHARDS"]) == document["spec"]["parallelism"]
            commands.append(argv[2:])
        else:
            assert container["image"].startswith("selfreward:")  # the image's entrypoint is selfreward
            commands.append(args)
    return commands


def test_every_command_the_kubernetes_jobs_run_exists_with_its_flags():
    commands = k8s_commands()
    assert [c[0] for c in commands] == ["sft", "prompts", "generate", "merge", "judge", "merge", "evaluate", "anchor-generate", "anchor-judge", "consistency-judge", "pairs", "meta-judge", "dpo", "policy", "head-to-head", "report"]
    for argv in commands:
        cli_accepts(argv)


def test_every_command_the_slurm_jobs_run_exists_with_its_flags(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, iterations=2)))
    result = CliRunner().invoke(app, ["slurm", "-r", str(recipe), "-o", str(tmp_path / "run"), "--shards", "3",
                                      "--sbatch=--partition=gpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    scripts = sorted((tmp_path / "run" / "slurm").glob("*.sbatch"))
    assert len(scripts) == 1 + 2 * 7 + 1  # SFT, then per iteration: prompts, generate + merge, judge + merge, pairs, dpo; the report
    for script in scripts:
        text = script.read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --partition=gpu" in text
        (line,) = [line for line in text.splitlines() if line.startswith("exec ")]
        argv = shlex.split(line.replace("$SLURM_ARRAY_TASK_ID", "1"))
        assert argv[1:3] == [sys.executable, "-m"] and argv[3] == "selfreward"
        cli_accepts(argv[4:])
        if "--shard" in argv:
            assert "#SBATCH --array=1-3" in text


def pip_requirements(command: str) -> list[str]:
    """The requirements of the `pip install` in a shell command line (options and their values left out)."""
    words = shlex.split(command.split("pip install", 1)[1].split("&&")[0])
    values = {i + 1 for i, w in enumerate(words) if w in ("-c", "--constraint", "--extra-index-url", "--index-url")}
    return sorted(w for i, w in enumerate(words) if not w.startswith("-") and i not in values)


def pip_constraints(command: str) -> list[str]:
    words = shlex.split(command.split("pip install", 1)[1].split("&&")[0])
    return [words[i + 1] for i, w in enumerate(words) if w in ("-c", "--constraint")]


def test_the_cpu_image_installs_what_the_readme_demo_installs():
    readme = (ROOT / "README.md").read_text()
    (demo,) = [line for line in readme.splitlines() if "selfreward iterate --recipe recipes/demo-cpu.yaml" in line and "pip install" in line]
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    cpu = dockerfile.split("FROM ${CPU_BASE} AS cpu", 1)[1].split("FROM ", 1)[0]
    (install,) = [line for line in cpu.splitlines() if "pip install" in line]
    assert pip_requirements(install) == pip_requirements(demo.replace(" -e ", " ")) == [".[embedded]", "torch==2.13.0"]
    assert pip_constraints(install) == pip_constraints(demo) == ["selfreward/engine/constraints.txt"]
