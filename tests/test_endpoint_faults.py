"""Faults of an OpenAI-compatible endpoint, each reproduced by a fake server on 127.0.0.1: retried where a
retry can help, otherwise one line; never a traceback, never fewer samples recorded than asked."""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler

import pytest
from typer.testing import CliRunner

from selfreward.backends.base import Sampling
from selfreward.backends.http import HttpBackend
from selfreward.errors import UserError
from selfreward.judge import Judge, JudgeItem
from tests.conftest import send_json, serving

GOOD = "Clear and correct.\nScore: 4"


def chat_reply(n: int) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": GOOD}, "finish_reason": "stop"}] * n,
            "usage": {"completion_tokens": 7 * n}}


class Faulty(BaseHTTPRequestHandler):
    """Answers well for the first `good` requests, then with `fault` (then well again after `bad` faulty ones)."""

    fault = "none"
    good = 0
    bad = 10**9
    requests: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Faulty.requests.append(body)
        number = len(Faulty.requests)
        faulty = Faulty.good < number <= Faulty.good + Faulty.bad
        fault = Faulty.fault if faulty else "none"
        if fault == "none":
            return send_json(self, chat_reply(body.get("n", 1)))
        if fault == "one_choice":  # a server that ignores n
            return send_json(self, chat_reply(1))
        if fault == "html":
            page = b"<html><body>502 Bad Gateway (nginx)</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return None
        if fault == "no_choices":
            return send_json(self, {"error": {"message": "server overloaded", "type": "overloaded"}})
        if fault == "choices_mistyped":
            return send_json(self, {"choices": "oops"})
        if fault == "content_mistyped":
            return send_json(self, {"choices": [{"message": {"content": 7}}]})
        if fault == "hang":
            time.sleep(3)
            return send_json(self, chat_reply(body["n"]))
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return None
        status = {"http400": 400, "http401": 401, "http429": 429, "http500": 500, "http503": 503}[fault]
        body = json.dumps({"error": {"message": f"status {status}"}}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return None

    def log_message(self, *args):
        pass


@pytest.fixture()
def faulty():
    Faulty.requests, Faulty.fault, Faulty.good, Faulty.bad = [], "none", 0, 10**9
    with serving(Faulty) as url:
        yield url


def backend(url: str, **options) -> HttpBackend:
    return HttpBackend(url, "judge", retries=2, concurrency=1, sleep=lambda seconds: None, **options)


def generate(b: HttpBackend, n: int = 1):
    return b.generate([b.text_prompt("hi")], n, Sampling(max_new_tokens=8, seed=5))


FAULTS = [
    ("html", "the reply is not JSON (<html><body>502 Bad Gateway (nginx)</body></html>); is this an OpenAI-compatible server's URL?"),
    ("no_choices", "no 'choices' in the reply (reply: {\"error\": {\"message\": \"server overloaded\""),
    ("choices_mistyped", "'choices' is not a non-empty list"),
    ("content_mistyped", "a choice without a 'message' whose 'content' is a string"),
    ("http429", "HTTP 429"),
    ("http500", "HTTP 500"),
    ("http503", "HTTP 503"),
    ("reset", "no whole reply (timed out or the connection broke)"),
    ("hang", "no whole reply (timed out or the connection broke) (ReadTimeout"),
]


@pytest.mark.parametrize(("fault", "message"), FAULTS, ids=[f for f, _ in FAULTS])
def test_a_lasting_fault_is_retried_then_one_line(faulty, fault, message):
    Faulty.fault = fault
    with pytest.raises(UserError) as raised:
        generate(backend(faulty, timeout=1.0))
    text = str(raised.value)
    assert "\n" not in text and message in text and text.endswith("3 attempts failed"), text
    assert len(Faulty.requests) == 3  # the first try and two retries


@pytest.mark.parametrize(("fault", "message"), FAULTS, ids=[f for f, _ in FAULTS])
def test_a_passing_fault_is_retried_and_the_answer_is_whole(faulty, fault, message):
    Faulty.fault, Faulty.bad = fault, 2
    ((completion,),) = generate(backend(faulty, timeout=1.0))
    assert completion.text == GOOD and len(Faulty.requests) == 3


@pytest.mark.parametrize(("fault", "status"), [("http400", 400), ("http401", 401)])
def test_a_client_error_is_not_retried(faulty, fault, status):
    Faulty.fault = fault
    with pytest.raises(UserError, match=rf"/v1/chat/completions: HTTP {status}: .*status {status}"):
        generate(backend(faulty))
    assert len(Faulty.requests) == 1


def test_a_server_that_ignores_n_is_asked_for_the_rest_with_other_seeds(faulty):
    Faulty.fault = "one_choice"
    (row,) = generate(backend(faulty), n=3)
    assert len(row) == 3 and [r["n"] for r in Faulty.requests] == [3, 2, 1]
    assert [r["seed"] for r in Faulty.requests] == [5, 6, 7]  # the same seed would give the same sample again
    results = Judge(backend(faulty), samples=3).score([JudgeItem("q", "a")])
    assert results[0].scores == [4, 4, 4]  # k = 3 judgments, as asked


def test_judging_through_a_failing_endpoint_keeps_what_finished_and_the_rerun_resumes(faulty, tmp_path):
    from selfreward.cli import app

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"i{n}", "instruction": f"Question {n}?", "response": f"Answer {n}."}) + "\n"
                             for n in range(12)))
    output = tmp_path / "scored.jsonl"
    args = ["judge", "--input", str(items), "--output", str(output), "--model", "judge", "--endpoint", faulty,
            "--concurrency", "1", "-k", "3"]
    Faulty.fault, Faulty.good = "html", 8  # the first unit of 8 items is judged, then the proxy fails
    result = CliRunner().invoke(app, args, terminal_width=400)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the reply is not JSON" in errors[0], result.output
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [f"i{n}" for n in range(8)]
    Faulty.requests, Faulty.fault = [], "none"
    result = CliRunner().invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, result.output
    assert len(Faulty.requests) == 4  # only the 4 items left
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [s["id"] for s in scored] == [f"i{n}" for n in range(12)] and all(s["scores"] == [4, 4, 4] for s in scored)


def test_expected_mode_needs_log_probabilities_and_says_so(faulty, tiny_model):
    from selfreward.models import load_tokenizer

    Faulty.fault = "none"  # a chat reply has no logprobs
    b = backend(faulty, api="completions", tokenizer=load_tokenizer(tiny_model))
    with pytest.raises(UserError, match=r"no 'choices\[0\]\.logprobs\.top_logprobs\[0\]' in the reply \(does the server return logprobs\?\)"):
        b.next_token_probs([b.text_prompt("hi")], [5, 6])
