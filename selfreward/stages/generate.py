"""Responses: N candidate answers per prompt from M_t, all prompts submitted together."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.backends import Backend, Sampling
from selfreward.jsonl import append_jsonl, resume_records
from selfreward.progress import progress_bar

log = logging.getLogger(__name__)


def run_generate(
    backend: Backend, prompts: list[dict], config, output: Path, seed: int = 0, label: str = "responses"
) -> dict[str, Any]:
    """Write `config.n` candidates per prompt to `output` (resumable by prompt id)."""
    started = time.perf_counter()
    done = {r["prompt_id"] for r in resume_records(output, "prompt_id", config.n)}
    todo = [p for p in prompts if p["id"] not in done]
    chunk = max(1, backend.chunk_prompts // config.n)
    with progress_bar(label, len(prompts), len(prompts) - len(todo)) as advance:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens, seed=seed + len(done) + start)
            outputs = backend.generate(
                [backend.chat_prompt([{"role": "user", "content": p["instruction"]}]) for p in batch], config.n, sampling
            )
            append_jsonl(output, (
                {"id": f"{p['id']}-r{i}", "prompt_id": p["id"], "index": i, "instruction": p["instruction"],
                 "response": c.text, "tokens": c.tokens, "finished": c.finished}
                for p, completions in zip(batch, outputs) for i, c in enumerate(completions)
            ))
            advance(len(batch))
    return {"prompts": len(prompts), "responses": len(prompts) * config.n, "seconds": round(time.perf_counter() - started, 1)}
