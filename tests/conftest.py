"""Fixtures: a tiny random Llama with a BPE tokenizer trained here (no downloads), and a scripted judge."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfreward.backends.base import Backend, Completion, Sampling

ROOT = Path(__file__).resolve().parents[1]
# 100 oasst1 message trees (Apache-2.0, tests/data/oasst1_sample.LICENSE): real human rankings, in the repository.
OASST1_SAMPLE = ROOT / "tests" / "data" / "oasst1_sample.jsonl.gz"


def needs(present: bool, what: str) -> None:
    """Skip a test whose system package, tool or privilege is absent; under CI (CI=true) fail instead, so
    that a CI machine missing one cannot pass with less tested. (A GPU or a CPU feature is a skip everywhere.)"""
    if present:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and this test needs {what}", pytrace=False)
    pytest.skip(f"needs {what}")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_tiny_model(target: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from selfreward.models import GEMMA_CHAT_TEMPLATE

    corpus = [json.loads(line)["instruction"] + " " + json.loads(line)["response"]
              for line in (ROOT / "data" / "ift.jsonl").read_text().splitlines()]
    corpus += [f"Score: {s}" for s in range(6)] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def scripted_score(prompt: str, sample: int) -> int:
    """A deterministic 'judgment' of a judge prompt: a random model cannot produce `Score: N` itself."""
    return hashlib.sha256(f"{prompt}|{sample}".encode()).digest()[0] % 6


class ScriptedJudge(Backend):
    """Wraps a real backend; judge prompts (they hold <response> tags) get scripted `Score: N` answers."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.path = inner.path
        self.chunk_prompts = 8
        self.judge_calls = 0

    def generate(self, prompts, n: int, sampling: Sampling):
        if prompts and "<response>" in prompts[0]:
            self.judge_calls += 1
            return [[Completion(f"Some reasoning.\nScore: {scripted_score(p, i)}", 6, True) for i in range(n)] for p in prompts]
        return self.inner.generate(prompts, n, sampling)

    def next_token_probs(self, prompts, token_ids):
        return self.inner.next_token_probs(prompts, token_ids)

    def close(self) -> None:
        self.inner.close()


def send_json(handler: BaseHTTPRequestHandler, payload: dict) -> None:
    """Answer an HTTP request of a fake server with a 200 JSON body."""
    body = json.dumps(payload).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server answering with `handler` while the block runs; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


# Libraries that announce deprecations through their loggers (transformers does, not through `warnings`).
DEPRECATION_LOGGERS = ("transformers", "trl", "peft", "accelerate", "torch", "vllm", "datasets")
DEPRECATED = ("deprecated", "will be removed", "no longer supported")


class _Deprecations(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.found: list[str] = []

    def emit(self, record) -> None:
        message = record.getMessage()
        if any(word in message.lower() for word in DEPRECATED):
            self.found.append(f"{record.name}: {message.splitlines()[0][:200]}")


@pytest.fixture(autouse=True)
def no_library_deprecations():
    """A deprecation a library logs during a test (transformers warns through its logger, e.g. of a call it
    will stop accepting) fails the test: the call is ours, and the pinned release after next breaks it."""
    handler = _Deprecations()
    loggers = [logging.getLogger(name) for name in DEPRECATION_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)
    if handler.found:
        pytest.fail("deprecated library use: " + "; ".join(sorted(set(handler.found))), pytrace=False)
