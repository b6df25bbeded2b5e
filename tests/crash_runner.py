"""Runs the CLI with every backend wrapped in the scripted judge (for the kill tests' subprocesses)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfreward.backends import open_backend  # noqa: E402
from selfreward.cli import app  # noqa: E402
from tests.conftest import ScriptedJudge  # noqa: E402


def scripted_open(path, config, seed=0, trust_remote_code=False):
    return ScriptedJudge(open_backend(path, config, seed, trust_remote_code))


if __name__ == "__main__":
    app(sys.argv[1:], obj={"open_backend": scripted_open})
