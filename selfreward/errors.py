"""The project's one exception type for user mistakes, and the disk problems that count as one."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad recipe, bad file, missing model).

    The CLI prints the message as one line and exits with code 2; anything else is a bug and keeps
    its traceback.
    """


# A full disk or a permission problem is the machine's state, not a bug: the user frees space or fixes
# permissions and reruns the same command, which resumes. Every other OSError keeps its traceback.
DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
# safetensors (Rust) reports I/O failures as SafetensorError('... (os error 28) ...'), not as OSError.
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_number(error: BaseException) -> int | None:
    """The errno behind an exception: an OSError's own, or the one a Rust I/O error quotes."""
    if isinstance(error, OSError):
        return error.errno
    match = RUST_OS_ERROR.search(str(error))
    return int(match.group(1)) if match else None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk or a permission problem while writing `path` into a one-line UserError."""
    try:
        yield
    except Exception as error:
        reason = DISK_PROBLEMS.get(os_error_number(error))
        if reason is None:
            raise
        raise UserError(f"{path}: cannot write: {reason} (rerun the same command to resume once fixed)") from None
