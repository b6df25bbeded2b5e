"""JSONL files (plain or `.gz`): strict reading with one-line errors, crash-safe appends, atomic rewrites.

Blank lines are skipped when reading (editors add them at the end of files); every other line must be
a JSON object. A torn last line (a write cut short by a crash) is repaired on resume by
`repair_tail`, which drops the bytes after the last newline. A full or unwritable disk is a UserError
naming the file, and leaves no partial record or temporary file behind.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from selfreward.errors import UserError, writing

# mkstemp creates files readable by the owner only; run files should get the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict[str, Any]]:
    """Read every object of a JSONL file; raise UserError naming file and line on the first bad one."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: dict[str, type] | None = None) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with _open_bytes(path) as handle:
        for number, raw in _numbered_lines(path, handle):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            except ValueError:  # Python refuses to convert integers of over 4300 digits
                raise UserError(f"{path}:{number}: not valid JSON (a number is too long)") from None
            except RecursionError:
                raise UserError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            for key, kind in (required or {}).items():
                value = record.get(key)
                if value is None:
                    raise UserError(f"{path}:{number}: missing field '{key}'")
                if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                    raise UserError(
                        f"{path}:{number}: field '{key}' must be {kind.__name__}, got {type(value).__name__}"
                    )
                if kind is str and not value.strip():
                    raise UserError(f"{path}:{number}: field '{key}' is empty")
            yield record


def _open_bytes(path: Path):
    """The file's bytes: gzip-compressed files (`.gz`, as hh-rlhf ships) are read through gzip."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _numbered_lines(path: Path, handle) -> Iterator[tuple[int, bytes]]:
    try:
        yield from enumerate(handle, start=1)
    except (OSError, EOFError) as error:  # a damaged or cut-short .gz file
        raise UserError(f"{path}: not a readable gzip file ({error})") from None


def read_json(path: str | Path) -> Any:
    """A whole JSON file; a UserError naming it if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}); the stage that wrote it can be rerun after deleting it "
                        "and its done/ record") from None


def repair_tail(path: Path) -> int:
    """Drop a torn last line (no trailing newline) left by a crash; return the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with writing(path), path.open("rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # Find the last newline by scanning back in blocks: files can be large.
        position, block = size, 1 << 16
        cut = 0
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                cut = start + index + 1
                break
            position = start
        handle.truncate(cut)
        return size - cut


def _json_bytes(value: Any, indent: int | None = None) -> bytes:
    """UTF-8 JSON, readable as is; all escaped where a string holds a lone surrogate, which UTF-8 cannot
    encode but a JSON file can carry ("\\ud800") and hand back to be written again."""
    try:
        return json.dumps(value, ensure_ascii=False, indent=indent).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, indent=indent).encode("ascii")


def _lines(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(_json_bytes(record) + b"\n" for record in records)


def _write_all(fd: int, data: bytes) -> None:
    # os.write may take less than it is given (a signal, a nearly full disk); the rest must follow.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records as whole lines and fsync, so a crash loses at most a torn tail line.

    A failed append (a full disk) is undone, so the file never ends in part of a record; the error is a
    UserError when the disk is full or not writable.
    """
    data = _lines(records)
    if not data:
        return 0
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                with suppress(OSError):  # truncating needs no free space; if it fails, resume cuts the tail
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    return data.count(b"\n")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file so readers see either the old or the new content, never a mix.

    On any failure the temporary file is removed and `path` is left as it was; a full or read-only
    disk is a UserError naming `path`.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(temp, 0o666 & ~_UMASK)
            os.replace(temp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temp)
            raise


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> int:
    data = _lines(records)
    write_atomic(path, data)
    return data.count(b"\n")


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, _json_bytes(value, indent=2) + b"\n")


def resume_records(path: Path, group_key: str | None = None, group_size: int = 1) -> list[dict[str, Any]]:
    """Records already written by an interrupted stage, made safe to append to.

    A torn last line is cut off. With `group_key`, records come in groups of `group_size` sharing that key
    (the n candidates of one prompt); an incomplete group, left by a crash between lines of one append,
    is removed, with an atomic rewrite, so the stage redoes it whole.
    """
    if not path.exists():
        return []
    repair_tail(path)
    records = read_jsonl(path)
    if group_key is None:
        return records
    counts: dict[Any, int] = {}
    for record in records:
        counts[record[group_key]] = counts.get(record[group_key], 0) + 1
    complete = [r for r in records if counts[r[group_key]] == group_size]
    if len(complete) != len(records):
        write_jsonl_atomic(path, complete)
    return complete
