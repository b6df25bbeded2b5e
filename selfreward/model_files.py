"""Damaged model directories found before anything loads them: one line naming the directory and what is
wrong, and, for a model inside a run directory, the stage that wrote it and how to redo it.

Checked without reading any weights (a few KiB per file): config.json parses; every safetensors file
named by the index exists; each file's header parses and its tensors fit in the file (a copy cut short, a
full disk); some tokenizer file is there. What only loading can tell (weights missing from a checkpoint,
shapes that do not fit the config) `selfreward.models.load_causal_lm` refuses the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfreward.errors import UserError

# A safetensors header larger than this is not a header: the first 8 bytes are not a length.
MAX_HEADER_BYTES = 100 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def redo_hint(path: Path) -> str:
    """How to get a good copy of the model at `path`: inside a run directory, the stage that wrote it."""
    path = path.resolve()
    if path.name == "m1" and (path.parent / "recipe.yaml").is_file():
        root, key, command = path.parent, "sft", "selfreward sft"
    elif path.name == "model" and path.parent.name.startswith("iter") and (path.parent.parent / "recipe.yaml").is_file():
        root, key = path.parent.parent, f"{path.parent.name}/dpo"
        command = f"selfreward dpo --iteration {path.parent.name[len('iter'):]}"
    else:
        return "copy or download it again"
    return (f"it was written by stage '{key}' of the run {root}: delete it and {root / 'done' / key}.json, then rerun "
            f"`{command}` (or `selfreward iterate`) with that --output to train it again")


def damaged(path: Path, what: str) -> UserError:
    return UserError(f"model '{path}': {what}; {redo_hint(path)}")


def check_model_dir(path: Path) -> None:
    """Refuse a local model directory whose files are missing, cut short or unreadable (see the module)."""
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except OSError:
        raise damaged(path, "no readable config.json") from None
    except ValueError as error:
        raise damaged(path, f"config.json is not valid JSON ({error})") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise damaged(path, "model.safetensors.index.json is damaged (no readable weight_map)") from None
        for name in files:
            if not (path / name).is_file():
                raise damaged(path, f"{name}, named in model.safetensors.index.json, is missing")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in path.glob("*.bin"))
            raise damaged(path, f"only pickled weights ({pickled[0]}), which selfreward never loads: save the model with "
                                "safe_serialization=True" if pickled else "no weights (*.safetensors)")
    for name in files:
        problem = safetensors_problem(path / name)
        if problem:
            raise damaged(path, f"{name} {problem}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise damaged(path, f"no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: its header must parse and every tensor's
    bytes must lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes: not even a header)"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            return f"is cut short or corrupt (its header claims {length} bytes; the file has {size})"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "is corrupt (its header is not a valid safetensors header)"
    if 8 + length + end > size:
        return f"is cut short ({size} bytes where its header needs {8 + length + end}: an interrupted copy or a full disk?)"
    return None
