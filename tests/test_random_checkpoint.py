"""benchmarks/random_checkpoint.py: what travels to a GPU machine rebuilds a checkpoint of the same shape."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.random_checkpoint import build, shape


def test_shape_then_build_gives_the_models_architecture_and_tokenizer_with_new_seeded_weights(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    shape(tiny_model, tmp_path / "shape")
    assert not list((tmp_path / "shape").glob("*.safetensors"))  # no weights travel
    assert (tmp_path / "shape" / "tokenizer.json.gz").exists() and not (tmp_path / "shape" / "tokenizer.json").exists()
    for name in ("a", "b"):
        build(tmp_path / "shape", tmp_path / name, seed=7)
    build(tmp_path / "shape", tmp_path / "c", seed=8)

    def config(folder) -> dict:
        return {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items() if k != "_name_or_path"}

    assert config(tmp_path / "a") == config(tiny_model)
    text = "Hello there, how are you today?"
    assert AutoTokenizer.from_pretrained(tmp_path / "a")(text).input_ids == AutoTokenizer.from_pretrained(tiny_model)(text).input_ids
    original, a, b, c = (load_file(str(folder / "model.safetensors")) for folder in (Path(tiny_model), tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert a.keys() == original.keys()
    assert all(a[k].shape == original[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed decides the weights
    weights = [k for k in a if a[k].dim() == 2]  # (norm weights start as constants)
    assert not any(torch.equal(a[k], original[k]) or torch.equal(a[k], c[k]) for k in weights)
