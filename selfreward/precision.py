"""Which number format to compute in, by what the machine does fast.

bfloat16 halves memory traffic and, where the hardware has bf16 arithmetic (GPUs from Ampere on; x86
CPUs with AVX-512 or AMX; arm CPUs with the BF16 extension), runs matmuls 2-10x faster than float32. On
a CPU without it (AVX2 only: most AMD EPYC/Ryzen before Zen 4, many laptops) PyTorch emulates bf16, many
times slower than float32 (benchmarks/RESULTS.md, AVX2-only EPYC). So
`auto`, the default, is decided per machine, from what the CPU or GPU reports (not by timing, so every
process of a run decides the same way).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512 BF16/AMX on x86, BF16 on arm)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: decide by the vector extension
        return torch.backends.cpu.get_cpu_capability() in {"AVX512", "AMX"}


def fast_bf16(device: str) -> bool:
    """Whether bfloat16 computes at least as fast as float32 on `device` ("cuda..." or "cpu")."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(requested: str, device: str | None = None) -> str:
    """The dtype name to load a model in for generation and judging.

    `auto`: bfloat16 where it is fast; on a GPU without bf16, float16; on a CPU without it, float32. An
    explicit dtype is kept, with a warning where it is the slow bf16 emulation of a CPU.
    """
    device = device or default_device()
    if requested == "auto":
        if fast_bf16(device):
            return "bfloat16"
        return "float16" if device.startswith("cuda") else "float32"
    if requested in {"bfloat16", "float16"} and device == "cpu" and not cpu_has_fast_bf16():
        log.warning("%s on this CPU (no AVX-512/AMX) is emulated and several times slower than float32: "
                    "set backend.dtype: auto", requested)
    return requested


def train_in_bf16(precision: str, device: str | None = None) -> bool:
    """Whether training autocasts to bf16: `bf16` always, `fp32` never, `auto` where bf16 is fast."""
    return precision == "bf16" or precision == "auto" and fast_bf16(device or default_device())
