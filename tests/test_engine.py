"""The CPU engine against plain transformers, on a tiny random model of every architecture it is tested on,
and the choice between them (`backend.cpu_engine`)."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from selfreward import engine
from selfreward.backends.base import Sampling
from selfreward.backends.transformers import TransformersBackend
from selfreward.errors import UserError
from selfreward.precision import cpu_has_fast_bf16
from selfreward.recipe import BackendSection

# The size of every tiny model; a few architectures name their sizes their own way.
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, head_dim=8, tie_word_embeddings=False)
OWN = {
    "gemma2": dict(query_pre_attn_scalar=8, sliding_window=16),
    "gemma3_text": dict(query_pre_attn_scalar=8, sliding_window=16),
    "gpt_neox": dict(num_key_value_heads=None, rotary_pct=0.5, use_parallel_residual=True),
    "mistral": dict(sliding_window=None),
    "starcoder2": dict(sliding_window=None),
}
PROMPTS = [  # of different lengths, in one batch; the last three share a long start (as judge prompts do)
    "Name a prime number.",
    "Write one sentence about the sea and the sky at night.",
    "Instruction: rate the response below from 0 to 5 points. Response: seven is prime.",
    "Instruction: rate the response below from 0 to 5 points. Response: nine is a prime number, it is.",
    "Instruction: rate the response below from 0 to 5 points. Response: 2",
]


def tiny_checkpoint(model_type: str, tokenizer_dir: str, folder: Path, dtype: str = "float32") -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = {**COMMON, **OWN.get(model_type, {})}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **{k: v for k, v in sizes.items() if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def both_paths(path: str, dtype: str = "float32", **backend) -> tuple[TransformersBackend, TransformersBackend]:
    """The engine (forced on whatever the installed versions: its arithmetic is what is tested) and plain."""
    tested = engine.tested_versions()
    on = TransformersBackend(path, BackendSection(dtype=dtype, cpu_engine="on", **backend), installed=tested)
    off = TransformersBackend(path, BackendSection(dtype=dtype, cpu_engine="off", **backend))
    assert on.path == "engine" and off.path == "plain"
    return on, off


def score_ids(backend: TransformersBackend) -> list[int]:
    return [backend.encode(str(digit))[0] for digit in range(6)]


@pytest.mark.parametrize("model_type", engine.ARCHITECTURES)
def test_engine_gives_plain_transformers_greedy_tokens_and_next_token_probabilities(model_type, tiny_model, tmp_path):
    on, off = both_paths(tiny_checkpoint(model_type, tiny_model, tmp_path / model_type), batch_size=4, prefill_tokens=64)
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    prompts = [on.text_prompt(p) for p in PROMPTS]
    engine_rows, plain_rows = on.generate(prompts, 1, greedy), off.generate(prompts, 1, greedy)
    assert [(c.text, c.tokens) for row in engine_rows for c in row] == [(c.text, c.tokens) for row in plain_rows for c in row]
    ids = score_ids(on) + list(range(7, 40))
    engine_probs, plain_probs = on.next_token_probs(prompts, ids), off.next_token_probs(prompts, ids)
    assert max(abs(a - b) for x, y in zip(engine_probs, plain_probs) for a, b in zip(x, y)) < 1e-6


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU computes bf16 by emulation; the engine's bf16 path runs where it is native")
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3"])
def test_engine_in_bf16_stays_within_bf16_rounding_of_plain_transformers(model_type, tiny_model, tmp_path):
    """bf16 rounds differently on the two paths (fused products, other summation orders): next-token
    probabilities agree to 2e-2, about two bf16 units in the last place of the logits."""
    on, off = both_paths(tiny_checkpoint(model_type, tiny_model, tmp_path / model_type), dtype="bfloat16", batch_size=4)
    prompts = [on.text_prompt(p) for p in PROMPTS]
    ids = score_ids(on)
    engine_probs, plain_probs = on.next_token_probs(prompts, ids), off.next_token_probs(prompts, ids)
    assert max(abs(a - b) for x, y in zip(engine_probs, plain_probs) for a, b in zip(x, y)) < 2e-2


def test_plain_path_samples_each_row_from_its_own_seed_whatever_the_batch(tiny_model):
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3, stop=("Score:",))
    small = TransformersBackend(tiny_model, BackendSection(dtype="float32", cpu_engine="off", batch_size=3))
    large = TransformersBackend(tiny_model, BackendSection(dtype="float32", cpu_engine="off", batch_size=64))
    prompts = [small.text_prompt(p) for p in PROMPTS]
    rows = small.generate(prompts, 4, sampling)
    assert rows == large.generate(prompts, 4, sampling)
    assert len({c.text for row in rows for c in row}) > 10  # sampled, not one answer repeated
    # A prompt's rows do not depend on the prompts beside it in the call.
    assert small.generate(prompts[:1], 4, sampling) == rows[:1]


def test_auto_runs_plain_transformers_with_an_untested_transformers_release_and_says_so(tiny_model, caplog):
    installed = {**engine.tested_versions(), "transformers": "99.0.0"}
    with caplog.at_level(logging.INFO, logger="selfreward.engine"):
        backend = TransformersBackend(tiny_model, BackendSection(cpu_engine="auto"), installed=installed)
    assert backend.path == "plain"
    lines = [r.getMessage() for r in caplog.records if r.name == "selfreward.engine"]
    assert len(lines) == 1 and "transformers 99.0.0" in lines[0] and "plain transformers" in lines[0]
    with pytest.raises(UserError, match="cpu_engine: on.*transformers 99.0.0"):
        TransformersBackend(tiny_model, BackendSection(cpu_engine="on"), installed=installed)


def test_auto_uses_the_engine_where_everything_was_tested(tiny_model):
    backend = TransformersBackend(tiny_model, BackendSection(cpu_engine="auto"), installed=engine.tested_versions())
    assert backend.path == "engine"


def test_engine_refuses_what_it_was_not_tested_on():
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    tested = engine.tested_versions()
    assert "architecture 'gpt2'" in engine.unsupported(model, "cpu", tested)
    assert "cuda" in engine.unsupported(model, "cuda", tested)
    assert engine.choose("off", model, "cpu", tested) is False
    with pytest.raises(UserError, match="architecture 'gpt2'"):
        engine.choose("on", model, "cpu", tested)


def test_tested_versions_come_from_the_constraints_ci_installs():
    constraints = (Path(engine.__file__).parent / "constraints.txt").read_text()
    for name, version in engine.tested_versions().items():
        assert f"\n{name}=={version}" in constraints


def test_cpu_engine_on_with_an_untested_architecture_stops_the_stage_with_one_line(tiny_model, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from selfreward.cli import app
    from tests.test_pipeline import tiny_recipe

    model = tiny_checkpoint("gpt2", tiny_model, tmp_path / "gpt2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, sft={"enabled": False}, backend={"cpu_engine": "on"})))
    result = CliRunner().invoke(app, ["prompts", "-r", str(recipe), "-o", str(tmp_path / "run"), "--iteration", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: backend.cpu_engine: on, but architecture 'gpt2'"), result.output
    assert "Traceback" not in result.output


def test_without_its_constraints_file_the_engine_counts_nothing_as_tested():
    """A package built without the file (as the image once was) runs plain transformers, saying why."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    assert "constraints.txt is missing" in engine.unsupported(model, "cpu", engine.tested_versions(), tested={})
