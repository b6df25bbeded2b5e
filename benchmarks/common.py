"""What every benchmark shares: the machine's measured matmul rate (the denominator of MFU), model
FLOPs per token, peak memory of a child process, and the printed table plus JSON file of results.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / the matmul rate measured in the same run, in
the format the pipeline computes in on this machine (`COMPUTE_DTYPE`: bf16 where the hardware has it,
else fp32; see selfreward/precision.py):
2 x parameters per token for a forward pass, 6 x for training (the usual convention; a path that skips
work, such as the LM head on prompt positions, counts the FLOPs it skipped as if done, and its table says so).
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path

from selfreward.precision import default_device, inference_dtype

# Where the pipeline computes here (a GPU if torch sees one) and what `backend.dtype: auto` loads models in
# there; benchmarks load in it too and measure its matmul rate on that device.
DEVICE = default_device()
COMPUTE_DTYPE = inference_dtype("auto")


def matmul_gflops(dtype: str = COMPUTE_DTYPE, size: int | None = None, seconds: float = 3.0, window: float = 0.5) -> float:
    """The machine's bf16 (or `dtype`) compute limit as MFU's denominator: GFLOP/s of square `size` matmuls
    on `DEVICE` (all the cores torch uses, or the GPU), the best `window`-second stretch of `seconds` (these
    shared machines have slow spells; a mean over them would understate the limit and overstate every MFU).
    A GPU gets larger matrices (8192 against 2048) and is synchronised before each stretch is timed."""
    import torch

    size = size or (8192 if DEVICE == "cuda" else 2048)
    kind = getattr(torch, dtype)
    a, b = (torch.randn(size, size, dtype=kind, device=DEVICE) for _ in range(2))
    # Launches on a GPU are asynchronous: run a few between synchronisations so the clock sees the work.
    per_sync = 10 if DEVICE == "cuda" else 1
    for _ in range(3):  # warm-up
        a @ b
    synchronize()
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        count, begun = 0, time.perf_counter()
        while time.perf_counter() - begun < window:
            for _ in range(per_sync):
                a @ b
            synchronize()
            count += per_sync
        best = max(best, 2 * size**3 * count / (time.perf_counter() - begun) / 1e9)
    return best


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU), so a clock read after it counts it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cudnn_attention(allowed: bool) -> bool | None:
    """Keep PyTorch's attention off cuDNN for this process unless `allowed` (flash, memory-efficient or math
    kernels instead): an experiment for GPUs, where cuDNN builds an execution plan per new shape, and
    decoding (one key more per step) and padded training batches bring a new shape at almost every call.
    Returns what a result records: whether cuDNN attention was allowed, None off CUDA."""
    import torch

    if not allowed:
        torch.backends.cuda.enable_cudnn_sdp(False)
    return allowed if DEVICE == "cuda" else None


def peak_cuda_gib() -> float | None:
    """Peak GPU memory this process allocated through torch, or None without a GPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def parameters(model_path: str) -> dict[str, int]:
    """Parameter counts of a checkpoint: total, and without the input embedding (what a forward pass
    multiplies per token when the LM head is skipped)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def mfu(tokens_per_s: float, flops_per_token: float, gflops: float) -> float:
    return tokens_per_s * flops_per_token / (gflops * 1e9)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def report(title: str, rows: Sequence[dict], output: Path | None, extra: dict | None = None) -> None:
    """Print `rows` as a table (columns = the union of their keys, in first-seen order) and write them,
    with `extra` (the machine's matmul rate, the model, ...), as JSON to `output`."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for key, value in (extra or {}).items():
        print(f"  {key}: {'(see the JSON)' if isinstance(value, dict) else value}")
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"title": title, **(extra or {}), "rows": list(rows)}, indent=2) + "\n")
        print(f"  written to {output}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
