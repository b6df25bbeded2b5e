"""The OpenAI-compatible backend against a small local server (standard library), not a real model."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest

from selfreward.backends.base import Sampling
from selfreward.backends.http import HttpBackend
from selfreward.errors import UserError
from selfreward.judge import Judge, JudgeItem
from tests.conftest import send_json, serving


class Handler(BaseHTTPRequestHandler):
    failures_left = 0
    requests: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.requests.append((self.path, body))
        if Handler.failures_left > 0:
            Handler.failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        # A judge that rambles past its score: the backend must cut at "Score: N" itself.
        content = "Relevant and clear.\nScore: 4\nMore text.\nScore: 1"
        if self.path.endswith("/chat/completions"):
            choices = [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}] * body["n"]
        else:
            choices = [{"text": content, "finish_reason": "length"}] * body["n"]
        send_json(self, {"choices": choices, "usage": {"completion_tokens": 9 * body["n"]}})

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Handler.requests, Handler.failures_left = [], 0
    with serving(Handler) as url:
        yield url


def test_chat_judging_through_an_endpoint(server):
    backend = HttpBackend(server, "judge-model", api="chat", concurrency=4)
    results = Judge(backend, samples=3).score([JudgeItem("q1", "a1"), JudgeItem("q2", "a2")])
    assert [r.scores for r in results] == [[4, 4, 4], [4, 4, 4]]
    assert len(Handler.requests) == 2  # one request per item, k samples each (n=3)
    for path, body in Handler.requests:
        assert path == "/v1/chat/completions" and body["n"] == 3 and body["model"] == "judge-model"
        assert "stop" not in body  # kept stop strings are applied locally
    contents = sorted(body["messages"][0]["content"] for _, body in Handler.requests)
    assert "<response>\na1\n</response>" in contents[0] and "<response>\na2\n</response>" in contents[1]


def test_retries_with_backoff_on_server_errors(server):
    Handler.failures_left = 2
    delays = []
    backend = HttpBackend(server, "m", retries=3, concurrency=1, sleep=delays.append)
    (row,) = backend.generate([backend.text_prompt("hi")], 1, Sampling(max_new_tokens=5))
    assert row[0].text.startswith("Relevant") and len(Handler.requests) == 3
    assert delays == [0.5, 1.0]  # exponential back-off


def test_unreachable_endpoint_is_one_clear_error():
    backend = HttpBackend("http://127.0.0.1:9", "m", retries=1, timeout=2, sleep=lambda seconds: None)
    with pytest.raises(UserError, match=r"endpoint http://127\.0\.0\.1:9/v1: unreachable"):
        backend.generate([backend.text_prompt("hi")], 1, Sampling())


def test_completions_send_token_ids_when_the_tokenizer_is_local(server, tiny_model):
    from selfreward.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    backend = HttpBackend(server, "m", api="completions", tokenizer=tokenizer)
    prompt = backend.chat_prompt([{"role": "user", "content": "hi"}])
    backend.generate([prompt], 1, Sampling(max_new_tokens=5))
    (_, body), = Handler.requests
    # Exactly the tokens of the rendered prompt: its BOS once, no second one added by the server.
    assert body["prompt"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert body["prompt"].count(tokenizer.bos_token_id) == 1
