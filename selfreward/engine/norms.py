"""Gemma's RMS norm for inference with one fp32 buffer instead of five.

`Gemma3RMSNorm` casts its bf16 input to fp32, then squares, scales and weights it into a fresh fp32 tensor at
each step. A pass of the 270M model has six such norms per layer (two on the queries and keys of every head),
and a fresh multi-MiB allocation is new memory from the kernel, page faults included (worst for the query
norm, whose input is a transposed view; figures in benchmarks/RESULTS.md). `inplace_norm_forward` does the same operations in the
same order on one fp32 copy of the input, so its output is the same, bit for bit (checked on a random input
before a norm gets it). With gradients enabled a norm runs its own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# Norm classes that compute (x / rms(x)) * (1 + weight) in fp32 and cast back, as Gemma 3's does.
_ONE_PLUS_WEIGHT_NORMS = {"Gemma3RMSNorm", "Gemma2RMSNorm", "GemmaRMSNorm"}


def inplace_norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return type(norm).forward(norm, x)
    hidden = x.float()
    scale = hidden.pow(2).mean(-1, keepdim=True).add_(norm.eps).rsqrt_()
    return hidden.mul_(scale).mul_(1.0 + norm.weight.float()).type_as(x)


def _same(norm: nn.Module) -> bool:
    x = torch.randn(3, 5, norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(norm.weight.dtype)
    with torch.inference_mode():
        return torch.equal(inplace_norm_forward(norm, x), type(norm).forward(norm, x))


def use_inplace_norms(model) -> int:
    """Give every Gemma RMS norm of a CPU model's decoder `inplace_norm_forward` where it gives the same bits
    as its own forward; returns how many got it (none on a GPU, whose caching allocator reuses memory)."""
    changed = 0
    for module in model.get_decoder().modules():
        if type(module).__name__ in _ONE_PLUS_WEIGHT_NORMS and module.weight.device.type == "cpu" and _same(module):
            module.forward = types.MethodType(inplace_norm_forward, module)
            changed += 1
    return changed
