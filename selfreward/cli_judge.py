"""`selfreward judge --input ...` (score items with any model or endpoint) and `selfreward judge-eval`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console

from selfreward.backends import Backend, Sampling, open_backend
from selfreward.errors import UserError
from selfreward.jsonl import read_jsonl, write_json_atomic
from selfreward.recipe import BackendSection

log = logging.getLogger(__name__)


def load_items(path: Path) -> list[dict[str, Any]]:
    """Validate the whole input before anything expensive: {id, instruction, response} per line, unique ids."""
    items = read_jsonl(path, {"instruction": str, "response": str})
    seen: set[str] = set()
    with path.open("rb") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    for number, item in zip(numbers, items):
        if not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
            raise UserError(f"{path}:{number}: field 'id' must be a string or an integer")
        key = str(item["id"])
        if key in seen:
            raise UserError(f"{path}:{number}: duplicate id '{key}'")
        seen.add(key)
    if not items:
        raise UserError(f"{path}: no items to judge")
    return items


def open_judge_backend(
    model: str, endpoint: str | None, api: str, backend: str, concurrency: int, timeout: float
) -> Backend:
    """A local model in a backend (in the recipe's default dtype, `auto`), or an OpenAI-compatible endpoint
    serving `model`."""
    from selfreward.models import load_tokenizer, resolve_model

    if endpoint:
        from selfreward.backends.http import HttpBackend

        tokenizer = None
        if api == "completions":
            tokenizer = load_tokenizer(resolve_model(model))
        return HttpBackend(endpoint, model, api=api, concurrency=concurrency, timeout=timeout, tokenizer=tokenizer)
    return open_backend(resolve_model(model), BackendSection(kind=backend))


def sampling(temperature: float, top_p: float, max_new_tokens: int, seed: int) -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)


def write_report(path: Path | None, report: dict) -> None:
    if path:
        write_json_atomic(path, report)
    Console().print_json(data=report)
