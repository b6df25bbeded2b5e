"""One process tree per stage: the processes a stage starts die with it, and a rerun never works beside them.

A stage that trains under `accelerate launch` (selfreward → accelerate launch → its workers, two levels)
or runs data-parallel replicas (selfreward → `selfreward <stage> --shard i/N` → engine processes) starts
processes that would otherwise live on when their parent is SIGKILLed (the OOM killer, a `kill -9`): a
rerun would then start the stage again beside them, two writers on one stage.

- Every process a stage starts asks the kernel to SIGKILL it when its parent dies (`PR_SET_PDEATHSIG`,
  Linux): a command the stage starts goes through `tied` (this module asks, then execs the command: the
  request survives exec; no `preexec_fn`, unsafe in a process with threads), and a worker or replica
  asks again at its start (`join_stage`), so the signal runs down the tree level by level. The signal follows the parent *thread*: processes are
  started from the main thread, which lives as long as the stage.
- Every such process that runs our code also holds the stage's worker lock (`locks/{stage}.workers`)
  shared until it exits; the stage's holder, having taken the stage's own lock, waits until it can take
  the worker lock exclusively (`wait_for_earlier_processes`) before it starts any work. A process of an
  earlier run that is still dying therefore holds the rerun back until it is gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

from selfreward.errors import UserError, writing

log = logging.getLogger(__name__)

# Names the worker lock in the environment of the processes a stage starts.
ENV = "SELFREWARD_STAGE_WORKERS_LOCK"
PR_SET_PDEATHSIG = 1
# How long a rerun waits for the processes of an earlier run to exit before it gives up with one line.
WAIT_SECONDS = 60.0

_held: int | None = None


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing). If the parent died before the
    request took effect, exit now."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def tied(command: list[str]) -> list[str]:
    """`command`, started so that it dies with the process that starts it (see the module)."""
    return [sys.executable, "-m", "selfreward.process_tree", *command]


def child_env(workers_lock: Path) -> dict[str, str]:
    """The environment of a process a stage starts: it joins the stage (`join_stage`)."""
    return {**os.environ, ENV: str(workers_lock)}


def join_stage() -> None:
    """In a process a stage started (a training worker, a data-parallel replica): die with the parent and
    hold the stage's worker lock shared until this process exits. Nothing where no stage started us."""
    global _held
    path = os.environ.get(ENV)
    if not path or _held is not None:
        return
    die_with_parent()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held = fd  # open until exit: the kernel releases it when the last process holding it is gone


def wait_for_earlier_processes(workers_lock: Path, stage: str, timeout: float = WAIT_SECONDS, sleep=time.sleep) -> None:
    """Before a stage starts (its own lock held): wait until no process of an earlier run of it holds the
    worker lock; after `timeout` seconds, one line naming the lock file."""
    with writing(workers_lock):
        fd = os.open(workers_lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{workers_lock}: processes of an earlier run of '{stage}' are still working after "
                                    f"{timeout:.0f} s; stop them (`fuser -k {workers_lock}`), then rerun") from None
                if not warned:
                    log.warning("'%s': waiting for the processes of an earlier run to exit", stage)
                    warned = True
                sleep(0.2)
    finally:
        os.close(fd)  # released: this run's own processes take it shared


if __name__ == "__main__":  # python -m selfreward.process_tree COMMAND...: `tied`
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
