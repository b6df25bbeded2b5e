"""A CPU model's decoder layers on oneDNN, the library behind PyTorch's CPU matrix products, called the way
PyTorch's own compiler calls it for inference (`torch.ops.mkldnn`): weights packed once, and the gated MLP's
product (in bf16 also its activation) fused into its products.

- **Packed weights.** `F.linear` in bf16 hands oneDNN the weight in PyTorch's row-major layout, and oneDNN
  reorders it into its blocked layout on every call. Reordered once, at load time, a product takes up to half
  the time for a few rows and ~5 % less for hundreds, bit for bit the same in bf16 (benchmarks/RESULTS.md).
- **The gated MLP** (`down(act(gate(x)) * up(x))`: Gemma, Llama, Qwen, Mistral) is three products and two
  elementwise passes over the (tokens, intermediate) activations in eager PyTorch, and its tanh-GELU runs at
  ~1.2 ns an element in bf16 here. oneDNN multiplies by `up` inside the second product, and in bf16 applies
  the activation to the gate product's fp32 accumulators. The function is the same; the roundings differ
  (the activation reads the fp32 accumulator, not a bf16 copy), if anything closer to fp32 than eager bf16.
  In fp32 (the format of CPUs without a bf16 path) oneDNN's activation post-ops are slower than the product
  followed by PyTorch's in-place activation, while the `up` product with the multiplication inside costs
  what it costs without. So in fp32 the activation runs in place after the gate product, and the MLP gives
  its own forward's output bit for bit.

- **The LM head** is packed the same way: a decoding step's head reads the whole vocabulary's weight for a
  few dozen rows; packed, it takes two thirds of the time, bit for bit the same.

The packed copy of a weight is kept beside the layer's own (~200 MB for the 270M model's decoder, ~335 MB
for its tied 262k-vocabulary head), which training and anything that reads the weights still use: with
gradients enabled every layer runs its own forward. An MLP of another shape (a bias, an activation oneDNN
lacks, another formula, found by comparing the two on a random input) keeps its own forward, with packed
products.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Activation(NamedTuple):
    post_op: str  # oneDNN's name and algorithm for it, applied inside the gate product (bf16)
    algorithm: str
    in_place: Callable[[torch.Tensor], torch.Tensor]  # PyTorch's, after the product (fp32)


# Each activation class that transformers' gated MLPs use.
_GELU_TANH = Activation("gelu", "tanh", lambda x: torch.ops.aten.gelu_(x, approximate="tanh"))
_SILU = Activation("swish", "", lambda x: F.silu(x, inplace=True))
_ACTIVATIONS = {"GELUTanh": _GELU_TANH, "SiLUActivation": _SILU, "SiLU": _SILU}
# The rows a packed layout is chosen for (a judging pass has ~100-1,000; decoding 1-64 gains most anyway).
_PACKED_FOR_ROWS = 512
# How far the fused MLP may be from the layer's own forward on a random input, relative to the output's
# mean size: rounding in bf16 gives ~0.5 %; another formula (act(up) * gate, a missing scale) gives ~100 %.
_AGREEMENT = 0.05


class OneDnnLayers(NamedTuple):
    linears: int  # products on packed weights
    mlps: int  # MLPs with the product (in bf16 also the activation) fused in


def packed_linear_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` on the weight oneDNN packed at load time."""
    if torch.is_grad_enabled():
        return nn.Linear.forward(linear, x)
    return torch.ops.mkldnn._linear_pointwise(x, linear.packed_weight, linear.bias, "none", [], "")


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))` with the product (and in bf16 the
    activation) inside the products."""
    if torch.is_grad_enabled():
        return type(mlp).forward(mlp, x)
    linear = torch.ops.mkldnn._linear_pointwise
    activation = _ACTIVATIONS[type(mlp.act_fn).__name__]
    if x.dtype == torch.bfloat16:
        gated = linear(x, mlp.gate_proj.packed_weight, None, activation.post_op, [], activation.algorithm)
    else:  # fp32: oneDNN's activation post-ops are slower than PyTorch's in-place pass (module docstring)
        gated = activation.in_place(linear(x, mlp.gate_proj.packed_weight, None, "none", [], ""))
    return mlp.down_proj(linear.binary(x, gated, mlp.up_proj.packed_weight, None, "mul"))


def _packable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.weight.device.type == "cpu"
            and module.weight.dtype in (torch.float32, torch.bfloat16))


def _fusable(mlp: nn.Module) -> bool:
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(hasattr(part, "packed_weight") and part.bias is None for part in parts)
            and type(getattr(mlp, "act_fn", None)).__name__ in _ACTIVATIONS)


def _agrees(mlp: nn.Module) -> bool:
    weight = mlp.gate_proj.weight
    x = torch.randn(2, 8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    with torch.inference_mode():
        own = type(mlp).forward(mlp, x).float()
        try:
            fused = fused_mlp_forward(mlp, x).float()
        except RuntimeError:  # a oneDNN without the post-op
            return False
    return bool((fused - own).abs().mean() <= _AGREEMENT * own.abs().mean())


def _pack(module: nn.Module) -> bool:
    """Give a linear layer `packed_linear_forward`; False where it is not one oneDNN can pack."""
    if not _packable(module):
        return False
    try:
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _PACKED_FOR_ROWS)
    except RuntimeError:  # a CPU or oneDNN build without this layout: the layer keeps F.linear
        return False
    module.forward = types.MethodType(packed_linear_forward, module)
    return True


def use_onednn(model) -> OneDnnLayers:
    """Give every linear layer of a CPU model's decoder layers, and its LM head, `packed_linear_forward`,
    then each gated MLP that computes what its own forward does `fused_mlp_forward`; returns how many of
    each (none on a GPU, or with a PyTorch built without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return OneDnnLayers(0, 0)
    head = model.get_output_embeddings()
    linears = int(head is not None and _pack(head))
    mlps = 0
    for layer in getattr(model.get_decoder(), "layers", []):
        linears += sum(_pack(module) for module in layer.modules())
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and _fusable(mlp) and _agrees(mlp):
            mlp.forward = types.MethodType(fused_mlp_forward, mlp)
            mlps += 1
    return OneDnnLayers(linears, mlps)
