"""A checkpoint with a model's architecture and tokenizer but freshly drawn weights, for speed runs on a machine
that the real weights cannot reach (a lent GPU machine takes 64 MiB of files: a config and a compressed
tokenizer travel, the 270M model's 536 MB of weights do not). Two steps:

    python -m benchmarks.random_checkpoint shape embedded:gemma3-270m .gpu/gemma3-270m   # here: config + tokenizer
    python -m benchmarks.random_checkpoint build .gpu/gemma3-270m /tmp/gemma3-270m-random  # there: + random weights

Speed and memory do not depend on the weights' values, with one exception the benchmarks account for: a
random model almost never samples its end-of-turn token, so every sample runs to `max_new_tokens` (the
generation benchmark counts the tokens it generated, whatever their number). Losses are those of a random
model (about ln(vocabulary)); the SFT benchmark compares rows with each other, which still holds.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

# The tokenizer's big file, gzipped for the trip (33 MB of JSON for Gemma 3's 262k vocabulary -> ~7 MB).
PACKED = {"tokenizer.json"}


def shape(model: str, folder: Path) -> None:
    """Write `model`'s config, generation config and tokenizer (its large files gzipped) to `folder`."""
    from transformers import AutoConfig, GenerationConfig

    from selfreward.models import load_tokenizer, resolve_model

    path = resolve_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(path).save_pretrained(folder)
    try:
        GenerationConfig.from_pretrained(path).save_pretrained(folder)
    except OSError:
        pass  # a checkpoint without one: transformers derives it from the config
    load_tokenizer(path).save_pretrained(folder)
    for name in PACKED:
        if (folder / name).exists():
            with (folder / name).open("rb") as source, gzip.open(folder / f"{name}.gz", "wb") as target:
                shutil.copyfileobj(source, target)
            (folder / name).unlink()


def build(folder: Path, output: Path, seed: int = 0) -> None:
    """A safetensors checkpoint in `output`: `folder`'s config with weights drawn as the model initialises
    them (seeded), in the config's dtype, and `folder`'s tokenizer unpacked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    output.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name.removesuffix(".gz") in PACKED and item.suffix == ".gz":
            with gzip.open(item, "rb") as source, (output / item.name.removesuffix(".gz")).open("wb") as target:
                shutil.copyfileobj(source, target)
        elif item.is_file():
            shutil.copy2(item, output / item.name)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(output, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    first = steps.add_parser("shape", help="write a model's config and tokenizer (no weights) to a folder")
    first.add_argument("model", help="embedded:NAME, a checkpoint folder or a hub id")
    first.add_argument("folder", type=Path)
    second = steps.add_parser("build", help="make a checkpoint with random weights from such a folder")
    second.add_argument("folder", type=Path)
    second.add_argument("output", type=Path)
    second.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step == "shape":
        shape(args.model, args.folder)
    else:
        build(args.folder, args.output, args.seed)


if __name__ == "__main__":
    main()
