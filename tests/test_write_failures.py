"""Fault injection: a full disk or a permission problem while writing is one line and exit code 2,
nothing is marked done, no partial file is left, and a rerun once it is fixed finishes the same way."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.backends import open_backend as real_open_backend
from selfreward.errors import UserError
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import append_jsonl, read_jsonl, write_atomic
from tests.conftest import ScriptedJudge
from tests.test_pipeline import tiny_recipe


class Fault:
    """The `call`-th call of `os.<name>` raises OSError(number); with `ours`, only calls from selfreward count.

    `partial` makes a failing os.write first write half of its data, as a nearly full disk does.
    """

    def __init__(self, monkeypatch, name: str, call: int, number: int, ours: bool = True, partial: bool = False):
        self.calls, self.active = 0, True
        real = getattr(os, name)

        def faulty(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if self.active and (caller.startswith("selfreward") or not ours):
                self.calls += 1
                if self.calls == call:
                    if partial:
                        real(args[0], args[1][: len(args[1]) // 2])
                    raise OSError(number, os.strerror(number))
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, faulty)


def leftovers(root: Path) -> list[str]:
    """Temporary files of atomic writes and staging directories of checkpoints."""
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".partial")))


@pytest.mark.parametrize(("name", "number", "reason"), [
    ("write", errno.ENOSPC, "no space left on device"),
    ("fsync", errno.ENOSPC, "no space left on device"),
    ("fsync", errno.EDQUOT, "disk quota exceeded"),
])
def test_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, name, number, reason):
    path = tmp_path / "x.json"
    path.write_text("old\n")
    Fault(monkeypatch, name, 1, number)
    with pytest.raises(UserError, match=f"^{path}: cannot write: {reason}"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize(("name", "partial"), [("write", False), ("write", True), ("fsync", False)])
def test_failed_append_leaves_only_the_earlier_whole_records(tmp_path, monkeypatch, name, partial):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    fault = Fault(monkeypatch, name, 1, errno.ENOSPC, partial=partial)
    with pytest.raises(UserError, match="no space left on device"):
        append_jsonl(path, [{"id": "c", "text": "x" * 1000}])
    assert fault.calls == 1
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'


def test_permission_denied_names_the_file(tmp_path, monkeypatch):
    # Injected, not chmod: root ignores permissions, and tests may run as root.
    Fault(monkeypatch, "open", 1, errno.EACCES, ours=False)
    with pytest.raises(UserError, match=f"^{tmp_path / 'x.jsonl'}: cannot write: permission denied"):
        append_jsonl(tmp_path / "x.jsonl", [{"id": "a"}])
    Fault(monkeypatch, "open", 1, errno.EROFS, ours=False)  # mkstemp's open
    with pytest.raises(UserError, match="x.json: cannot write: read-only file system"):
        write_atomic(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


MARK_DONE = """
import sys
from pathlib import Path
from selfreward.errors import UserError
from selfreward.run.directory import RunDir
try:
    RunDir(Path(sys.argv[1])).mark_done("sft", {"steps": 1})
except UserError as error:
    print(error)
    sys.exit(2)
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_read_only_run_directory_is_a_user_error(tmp_path):
    """Run without the power to ignore permissions: as root (CI), in a child whose capability bounding set
    lacks DAC override (util-linux setpriv), so the test runs instead of skipping."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        if os.geteuid() == 0:
            from tests.conftest import needs

            needs(shutil.which("setpriv") is not None, "util-linux's setpriv (to drop root's DAC override)")
            done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", MARK_DONE, str(run)],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2 and "permission denied" in done.stdout, done.stdout + done.stderr
        else:
            with pytest.raises(UserError, match="permission denied"):
                RunDir(run).mark_done("sft", {"steps": 1})
    finally:
        run.chmod(0o755)
    assert not RunDir(run).is_done("sft")


def test_other_os_errors_stay_bugs(tmp_path, monkeypatch):
    Fault(monkeypatch, "fsync", 1, errno.EIO)
    with pytest.raises(OSError) as raised:
        append_jsonl(tmp_path / "x.jsonl", [{"id": "a"}])
    assert raised.value.errno == errno.EIO and not isinstance(raised.value, UserError)


def test_full_disk_while_marking_done_leaves_the_stage_unfinished(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    Fault(monkeypatch, "write", 1, errno.ENOSPC)
    with pytest.raises(UserError, match=r"done/sft\.json: cannot write: no space left on device"):
        run.mark_done("sft", {"steps": 1})
    assert not run.is_done("sft") and leftovers(tmp_path) == []


def test_full_disk_while_saving_a_checkpoint_keeps_the_old_one_and_no_staging(tiny_model, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from selfreward.models import load_causal_lm, load_tokenizer, save_checkpoint

    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    target = tmp_path / "model"
    save_checkpoint(model, tokenizer, target)
    before = (target / "model.safetensors").read_bytes()

    def full_disk(directory, **kwargs):  # what safetensors raises when the disk fills mid-file
        Path(directory).mkdir()
        Path(directory, "model.safetensors").write_bytes(b"half a tensor")
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path \"{directory}\"")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(UserError, match=f"^{target}: cannot write: no space left on device"):
        save_checkpoint(model, tokenizer, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# The whole CLI: `selfreward judge` (stage mode) on a run whose responses exist.


def scripted_open(path, config, seed=0, trust_remote_code=False):
    return ScriptedJudge(real_open_backend(path, config, seed, trust_remote_code))


def cli(*args: str):
    from selfreward.cli import app

    return CliRunner().invoke(app, list(args), obj={"open_backend": scripted_open})


@pytest.fixture(scope="module")
def generated(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run directory) with iteration 1's prompts and responses done: 18 responses to judge."""
    root = tmp_path_factory.mktemp("generated")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, iterations=1, sft={"enabled": False})))
    for command in ("prompts", "generate"):
        result = cli(command, "-r", str(recipe), "-o", str(root / "run"), "-t", "1")
        assert result.exit_code == 0, result.output
    return recipe, root / "run"


def judge_stage(recipe: Path, run: Path):
    return cli("judge", "-r", str(recipe), "-o", str(run), "-t", "1")


def finished_record(run: RunDir) -> dict:
    record = run.done_record("iter1/judge")
    return {key: value for key, value in record.items() if key not in ("seconds", "judged_now")}


@pytest.mark.parametrize(("name", "call", "number", "file", "reason"), [
    # the third of five chunks of judgments (4 items each)
    ("write", 3, errno.ENOSPC, "iter1/judgments.jsonl", "no space left on device"),
    ("fsync", 2, errno.ENOSPC, "iter1/judgments.jsonl", "no space left on device"),
    # every chunk written, then the done/ record
    ("write", 6, errno.ENOSPC, "done/iter1/judge.json", "no space left on device"),
    # the judgments file cannot be created (the first opens are the stage's lock files: its own, its workers')
    ("open", 3, errno.EACCES, "iter1/judgments.jsonl", "permission denied"),
    # the workers' lock file cannot be created
    ("open", 2, errno.EACCES, "locks/iter1/judge.workers", "permission denied"),
])
def test_judging_on_a_full_disk_fails_in_one_line_and_resumes_to_the_same_records(
    generated, tmp_path, monkeypatch, name, call, number, file, reason
):
    recipe, source = generated
    clean, faulty = RunDir(tmp_path / "clean"), RunDir(tmp_path / "faulty")
    shutil.copytree(source, clean.root)
    shutil.copytree(source, faulty.root)
    assert judge_stage(recipe, clean.root).exit_code == 0

    fault = Fault(monkeypatch, name, call, number)
    result = judge_stage(recipe, faulty.root)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert f"error: {faulty.root / file}: cannot write: {reason}" in line
    assert "Traceback" not in result.output
    assert not faulty.is_done("iter1/judge") and leftovers(faulty.root) == []
    if faulty.judgments(1).exists():  # whole records only: the failed chunk was taken back
        assert faulty.judgments(1).read_bytes().endswith(b"\n")
        assert len(read_jsonl(faulty.judgments(1))) == {3: 8, 2: 4, 6: 18}[call]

    fault.active = False
    assert judge_stage(recipe, faulty.root).exit_code == 0
    assert read_jsonl(faulty.judgments(1)) == read_jsonl(clean.judgments(1))
    assert finished_record(faulty) == finished_record(clean)


def test_an_unexpected_os_error_keeps_its_traceback(generated, tmp_path, monkeypatch):
    recipe, source = generated
    shutil.copytree(source, tmp_path / "run")
    Fault(monkeypatch, "fsync", 1, errno.EIO)
    result = judge_stage(recipe, tmp_path / "run")
    assert result.exit_code == 1 and isinstance(result.exception, OSError)
    assert not isinstance(result.exception, UserError)
    assert json.loads((tmp_path / "run" / "done" / "iter1" / "generate.json").read_text())["responses"] == 18
