"""Prompt templates: plain text files with {placeholders}, shipped defaults that users can copy and change."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from selfreward.errors import UserError

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def load_template(path: str | None, default: str, required: tuple[str, ...]) -> str:
    """The user's template file if given, else the packaged `default`; it must use every `required` field."""
    if path is None:
        return resources.files("selfreward.templates").joinpath(default).read_text(encoding="utf-8")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: template file not found")
    text = file.read_text(encoding="utf-8")
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        raise UserError(f"{path}: template lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return text


def fill(template: str, **values: str) -> str:
    """Substitute placeholders in one pass, so braces inside the values are never expanded again."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
