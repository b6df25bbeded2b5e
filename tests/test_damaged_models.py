"""Damaged model directories: one line naming the directory and what is wrong, exit 2; inside a run
directory, also the stage that wrote the model and how to redo it. Never a traceback, never random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from selfreward.cli import app


def cut_in_half(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def cut_to_a_stub(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x10\x00")


def corrupt_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"x" * 32
    f.write_bytes(bytes(data))


def drop_a_weight(d: Path) -> None:
    weights = load_file(d / "model.safetensors")
    del weights[next(k for k in sorted(weights) if "layers.1.mlp" in k)]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


def misfit_config(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))


def lose_a_shard(d: Path) -> None:
    weights = load_file(d / "model.safetensors")
    names = sorted(weights)
    first = {k: weights[k] for k in names[: len(names) // 2]}
    save_file(first, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: "model-00001-of-00002.safetensors" if k in first else "model-00002-of-00002.safetensors" for k in names}}))


def remove_tokenizer(d: Path) -> None:
    for f in [*d.glob("tokenizer*"), *d.glob("special_tokens*")]:
        f.unlink()


def break_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", ')


def pickled_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


DAMAGE = [
    (cut_in_half, "model.safetensors is cut short"),
    (cut_to_a_stub, "model.safetensors is cut short"),
    (corrupt_header, "model.safetensors is corrupt"),
    (drop_a_weight, "1 weight(s) missing from its checkpoint (the first: model.layers.1.mlp."),
    (misfit_config, "weights whose shapes do not fit its config.json"),
    (lose_a_shard, "model-00002-of-00002.safetensors, named in model.safetensors.index.json, is missing"),
    (remove_tokenizer, "no tokenizer"),
    (break_config, "config.json is not valid JSON"),
    (pickled_only, "only pickled weights (pytorch_model.bin), which selfreward never loads"),
]


def one_line(output: str) -> str:
    """The one error line (a progress log line may come before it)."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize(("damage", "message"), DAMAGE, ids=[d.__name__ for d, _ in DAMAGE])
def test_a_damaged_model_is_one_line_and_exit_2(tiny_model, tmp_path, damage, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "instruction": "Say hi.", "response": "Hi."}) + "\n")
    result = CliRunner().invoke(app, ["judge", "--input", str(items), "--output", str(tmp_path / "out.jsonl"), "--model", str(model)],
                                terminal_width=400)
    assert result.exit_code == 2
    line = one_line(result.output)
    assert f"model '{model}'" in line and message in line and "copy or download it again" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_a_damaged_model_in_a_run_directory_names_the_stage_that_wrote_it(tiny_model, tmp_path):
    from tests.test_pipeline import tiny_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_model, iterations=1)))
    run = tmp_path / "run"
    (run / "iter1").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.read_text())
    for target in (run / "m1", run / "iter1" / "model"):
        shutil.copytree(tiny_model, target)
        cut_in_half(target)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "instruction": "Say hi.", "response": "Hi."}) + "\n")
    for target, stage, command in ((run / "m1", "sft", "selfreward sft"), (run / "iter1" / "model", "iter1/dpo", "selfreward dpo --iteration 1")):
        result = CliRunner().invoke(app, ["judge", "--input", str(items), "--output", str(tmp_path / "out.jsonl"), "--model", str(target)],
                                    terminal_width=400)
        assert result.exit_code == 2
        line = one_line(result.output)
        assert f"written by stage '{stage}' of the run {run.resolve()}: delete it and {run.resolve() / 'done' / stage}.json" in line
        assert f"`{command}`" in line
