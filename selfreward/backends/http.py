"""An OpenAI-compatible HTTP endpoint (`vllm serve`, TGI, llama.cpp server, hosted APIs) as a backend.

`api: chat` sends the conversation to /v1/chat/completions and lets the server apply the chat template;
`api: completions` sends rendered text to /v1/completions (needed for the judge's `expected` mode, which
reads next-token log-probabilities after a forced "Score:"). Requests run concurrently up to a bound, time
out, and are retried with exponential back-off on connection errors, timeouts, 429 and 5xx, and on replies
that are not what the API promises (a proxy's HTML page, an error object without `choices`); every reply
is checked before it is read. A server that returns fewer choices than `n` is asked again for the rest.
Faults left when the retries run out are one line (UserError); what finished before stays on disk.

The client is httpx, not the `openai` package: that package builds its reply objects without validating
them unless made strict, and strict validation also requires fields we never read (id, created, object);
here exactly what is read is checked.
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

    def _post(self, path: str, body: dict, problem=lambda reply: None) -> dict:
        """POST `body`; the reply's JSON object once `problem(reply)` finds nothing wrong with it.

        Retried with exponential back-off: connection errors, timeouts and resets; 408, 409, 429 and 5xx; a
        body that is not JSON (a proxy's error page) or a reply `problem` rejects (an overloaded server's
        error object). Other HTTP errors, and any fault left when the retries run out, are one UserError.
        """
        import httpx

        url = f"{self.base}{path}"
        fault = ""
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(url, json=body)
            except httpx.TransportError as error:
                what = "unreachable" if isinstance(error, httpx.ConnectError) else "no whole reply (timed out or the connection broke)"
                fault = f"{what} ({type(error).__name__}: {error})"
            else:
                if response.status_code >= 400:
                    if response.status_code not in RETRY_STATUS:
                        raise UserError(f"endpoint {url}: HTTP {response.status_code}: {excerpt(response.text)}")
                    fault = f"HTTP {response.status_code}: {excerpt(response.text)}"
                else:
                    try:
                        reply = response.json()
                    except ValueError:
                        fault = f"the reply is not JSON ({excerpt(response.text)}); is this an OpenAI-compatible server's URL?"
                    else:
                        found = "the reply is not a JSON object" if not isinstance(reply, dict) else problem(reply)
                        if not found:
                            return reply
                        fault = f"{found} (reply: {excerpt(json.dumps(reply))})"
            if attempt == self.retries:
                break
            delay = min(30.0, 0.5 * 2**attempt)
            log.warning("endpoint %s: attempt %d failed (%s), retrying in %.1f s", url, attempt + 1, fault, delay)
            self.sleep(delay)
        where = self.base if fault.startswith("unreachable") else url
        raise UserError(f"endpoint {where}: {fault}; {self.retries + 1} attempts failed")

    def _completion_prompt(self, prompt: str) -> str | list[int]:
        """Token ids where a local tokenizer exists: rendered prompts already hold the BOS text, and a
        server tokenizing them again would add a second BOS (vLLM does), which changes what the model sees."""
        return self.encode(prompt) if self.tokenizer is not None else prompt

    def _request(self, prompt: str, n: int, sampling: Sampling) -> list[Completion]:
        """`n` completions of `prompt`. A server that returns fewer choices than asked (several ignore `n`)
        is asked again for the rest, each time with another seed, so that the k samples stay k and distinct."""
        chat = isinstance(prompt, ChatPrompt)
        completions: list[Completion] = []
        while len(completions) < n:
            wanted = n - len(completions)
            body = {
                "model": self.model, "n": wanted, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_new_tokens,
                "seed": None if sampling.seed is None else sampling.seed + len(completions),
            }
            # Servers drop the stop string they matched and do not say which one it was; where the caller
            # keeps it (the judge's "Score: N"), stop strings are applied here instead.
            if sampling.stop and not sampling.keep_stop:
                body["stop"] = list(sampling.stop)
            if chat:
                reply = self._post("/chat/completions", {**body, "messages": json.loads(prompt)}, choices_problem(chat=True))
                choices = [((c["message"].get("content") or ""), c.get("finish_reason")) for c in reply["choices"][:wanted]]
            else:
                reply = self._post("/completions", {**body, "prompt": self._completion_prompt(prompt)}, choices_problem(chat=False))
                choices = [(c.get("text") or "", c.get("finish_reason")) for c in reply["choices"][:wanted]]
            if len(choices) < wanted and not completions:
                log.warning("endpoint %s: %d of %d choices in a reply (the server ignores n): asking again for the rest",
                            self.base, len(choices), wanted)
            usage = reply.get("usage")
            used = usage.get("completion_tokens") if isinstance(usage, dict) else None
            tokens = used // len(reply["choices"]) if isinstance(used, int) else 0
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
                                                "temperature": 0.0, "logprobs": TOP_LOGPROBS}, logprobs_problem)
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0] or {}
            return [math.exp(top[w]) if w in top else 0.0 for w in wanted]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def close(self) -> None:
        self.client.close()


def excerpt(text: str, limit: int = 120) -> str:
    """The start of a reply body on one line, for an error message."""
    flat = " ".join(text.split())
    return flat[:limit] + ("..." if len(flat) > limit else "") if flat else "an empty body"


def choices_problem(chat: bool):
    """What is wrong with a completion reply's `choices`, or None: a non-empty list of objects, each with
    `message.content` (chat; null allowed) or `text` (completions) a string."""

    def problem(reply: dict) -> str | None:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices:
            return "no 'choices' in the reply" if "choices" not in reply else "'choices' is not a non-empty list"
        for choice in choices:
            if not isinstance(choice, dict):
                return "a choice is not an object"
            if chat:
                message = choice.get("message")
                if not isinstance(message, dict) or not isinstance(message.get("content") or "", str):
                    return "a choice without a 'message' whose 'content' is a string"
            elif not isinstance(choice.get("text"), str):
                return "a choice without a 'text' string"
        return None

    return problem


def logprobs_problem(reply: dict) -> str | None:
    """What is wrong with a /completions reply read for next-token log-probabilities, or None."""
    choices = reply.get("choices")
    try:
        top = choices[0]["logprobs"]["top_logprobs"][0]
    except (TypeError, KeyError, IndexError):
        return "no 'choices[0].logprobs.top_logprobs[0]' in the reply (does the server return logprobs?)"
    if top is not None and not (isinstance(top, dict) and all(isinstance(v, (int, float)) for v in top.values())):
        return "'top_logprobs[0]' is not an object of numbers"
    return None

