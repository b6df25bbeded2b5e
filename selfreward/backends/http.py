"""An OpenAI-compatible HTTP endpoint (`vllm serve`, TGI, llama.cpp server, hosted APIs) as a backend.

`api: chat` sends the conversation to /v1/chat/completions and lets the server apply the chat template;
`api: completions` sends rendered text to /v1/completions (needed for the judge's `expected` mode, which
reads next-token log-probabilities after a forced "Score:"). Requests run concurrently up to a bound, time
out, and are retried with exponential back-off on connection errors, 429 and 5xx.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from selfreward.backends.base import TOP_LOGPROBS, Backend, Completion, Sampling, cut_at_stop
from selfreward.errors import UserError

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ChatPrompt(str):
    """A conversation carried through the string-typed prompt interface (JSON of the messages)."""


class HttpBackend(Backend):
    path = "http"

    def __init__(
        self,
        endpoint: str,
        model: str,
        api: str = "chat",
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        concurrency: int = 8,
        tokenizer=None,
        sleep=time.sleep,
    ) -> None:
        """`sleep` waits between retries (tests pass one that records the delays instead)."""
        import httpx

        if api not in ("chat", "completions"):
            raise UserError(f"endpoint api must be 'chat' or 'completions', not '{api}'")
        self.base = endpoint.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.api, self.retries, self.concurrency = model, api, retries, concurrency
        self.tokenizer = tokenizer
        self.sleep = sleep
        self.chunk_prompts = 8 * concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=concurrency))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if self.api == "chat":
            return ChatPrompt(json.dumps(messages))
        if self.tokenizer is None:
            raise UserError("endpoint api 'completions' needs a tokenizer (--model with a local tokenizer) for chat prompts")
        return super().chat_prompt(messages)

    def text_prompt(self, text: str) -> str:
        return text if self.api == "completions" else ChatPrompt(json.dumps([{"role": "user", "content": text}]))

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this operation needs a local tokenizer for the endpoint's model")
        return super().encode(prompt)

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        url = f"{self.base}{path}"
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(url, json=body)
            except httpx.TransportError as error:
                if attempt == self.retries:
                    raise UserError(f"endpoint {self.base}: unreachable ({type(error).__name__}: {error})") from None
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise UserError(f"endpoint {url}: HTTP {response.status_code}: {response.text[:200]}")
            delay = min(30.0, 0.5 * 2**attempt)
            log.warning("endpoint %s: attempt %d failed, retrying in %.1f s", url, attempt + 1, delay)
            self.sleep(delay)
        raise AssertionError("unreachable")

    def _completion_prompt(self, prompt: str) -> str | list[int]:
        """Token ids where a local tokenizer exists: rendered prompts already hold the BOS text, and a
        server tokenizing them again would add a second BOS (vLLM does), which changes what the model sees."""
        return self.encode(prompt) if self.tokenizer is not None else prompt

    def _request(self, prompt: str, n: int, sampling: Sampling) -> list[Completion]:
        body = {
            "model": self.model, "n": n, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens, "seed": sampling.seed,
        }
        # Servers drop the stop string they matched and do not say which one it was; where the caller
        # keeps it (the judge's "Score: N"), stop strings are applied here instead.
        if sampling.stop and not sampling.keep_stop:
            body["stop"] = list(sampling.stop)
        if isinstance(prompt, ChatPrompt):
            reply = self._post("/chat/completions", {**body, "messages": json.loads(prompt)})
            choices = [(c["message"].get("content") or "", c.get("finish_reason")) for c in reply["choices"]]
        else:
            reply = self._post("/completions", {**body, "prompt": self._completion_prompt(prompt)})
            choices = [(c.get("text") or "", c.get("finish_reason")) for c in reply["choices"]]
        tokens = reply.get("usage", {}).get("completion_tokens", 0) // max(1, n)
        completions = []
        for text, reason in choices:
            text, cut = cut_at_stop(text, sampling)
            completions.append(Completion(text.strip(), tokens, cut or reason == "stop"))
        return completions

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling) -> list[list[Completion]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self._request(p, n, sampling), prompts))

    def next_token_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        if self.api != "completions":
            raise UserError("the judge's expected mode needs an endpoint with api 'completions' (log-probabilities)")
        wanted = [self.tokenizer.decode([t]) for t in token_ids]

        def one(prompt: str) -> list[float]:
            reply = self._post("/completions", {"model": self.model, "prompt": self._completion_prompt(prompt), "max_tokens": 1,
                                                "temperature": 0.0, "logprobs": TOP_LOGPROBS})
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0] or {}
            return [math.exp(top[w]) if w in top else 0.0 for w in wanted]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def close(self) -> None:
        self.client.close()

