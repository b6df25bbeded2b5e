"""A CPU inference engine for the transformers backend: an opt-in speed-up behind `backend.cpu_engine`.

What it changes, each module one job (figures in benchmarks/RESULTS.md):
- `decoding`: sampling n continuations of many prompts: each prompt computed once for its n samples,
  continuous batching (finished rows leave, waiting prompts join), top-p among a few candidates, stop
  strings checked on a row's last tokens; and the prompt passes of next-token probabilities, which compute
  what many prompts share (the judge's rubric, an instruction) once and project only last positions;
- `top_p`: each row's token from its own random stream, the nucleus found without sorting the vocabulary;
- `kv_cache`: a cache whose layers append in place into reserved memory;
- `attention`: grouped-query attention computed per key/value head (decoding) or in cache-sized slices;
- `onednn`: linear layers on weights packed once, the gated MLP fused into its products;
- `norms`: Gemma's RMS norm in one buffer (same bits);
- `vllm_top_p`: the same top-p as a vLLM logits processor, for vLLM on a CPU.

It reaches into library internals (cache layers, the attention registry, private oneDNN ops, layers'
`forward`), so it runs only where it was tested: `auto` uses it on a CPU, with the torch and transformers
releases CI installs (`constraints.txt` beside this file), for the architectures in `ARCHITECTURES`
(tests/test_engine.py checks each against plain transformers); anywhere else the backend runs plain
transformers and logs why. `on` refuses, with one line, where it is not supported; `off` never uses it.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata, resources
from typing import Literal

from selfreward.errors import UserError

log = logging.getLogger(__name__)

Setting = Literal["auto", "on", "off"]

# `config.model_type` of the architectures the engine is tested on (tests/test_engine.py builds a tiny
# random model of each and compares the engine with plain transformers).
ARCHITECTURES = (
    "gemma2", "gemma3_text", "gpt_neox", "granite", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3",
    "stablelm", "starcoder2",
)
# The libraries whose internals the engine uses; their tested releases are pinned in constraints.txt.
LIBRARIES = ("torch", "transformers")


def _release(version: str) -> str:
    """`2.13.0+cpu` → `2.13.0`: a local build tag names a build of the same release."""
    return version.split("+", 1)[0]


def tested_versions() -> dict[str, str]:
    """The release of each of `LIBRARIES` that CI installs, read from constraints.txt. A library without a
    pin there, or every library if the file is missing, is left out: it counts as untested."""
    try:
        text = resources.files(__name__).joinpath("constraints.txt").read_text(encoding="utf-8")
    except OSError:
        return {}
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    return {name: _release(pins[name]) for name in LIBRARIES if name in pins}


def installed_versions() -> dict[str, str]:
    return {name: _release(metadata.version(name)) for name in LIBRARIES}


def unsupported(model, device: str, installed: dict[str, str] | None = None, tested: dict[str, str] | None = None) -> str | None:
    """Why the engine would run `model` on `device` untested (None if it would not): a device other than a
    CPU, a torch or transformers release other than CI's, or an architecture off the tested list. `installed`
    and `tested` stand for the installed and the tested releases (tests pass others)."""
    if device != "cpu":
        return f"the model runs on {device}, and the engine is for CPUs"
    installed = installed or installed_versions()
    tested = tested_versions() if tested is None else tested
    for name in LIBRARIES:
        if name not in tested:
            return f"the release of {name} the engine was tested with is unknown (selfreward/engine/constraints.txt is missing or lacks it)"
        if installed.get(name) != tested[name]:
            return f"{name} {installed.get(name)} is installed; the engine is tested with {name} {tested[name]}"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"architecture '{model_type}' is not among those the engine is tested on ({', '.join(ARCHITECTURES)})"
    return None


def choose(setting: Setting, model, device: str, installed: dict[str, str] | None = None) -> bool:
    """Whether the transformers backend runs `model` on the engine under `backend.cpu_engine: setting`.
    `installed` stands for the installed library versions (tests pass others)."""
    if setting == "off":
        return False
    reason = unsupported(model, device, installed)
    if reason is None:
        return True
    if setting == "on":
        raise UserError(f"backend.cpu_engine: on, but {reason}; set backend.cpu_engine to auto or off")
    if device == "cpu":  # on a GPU the plain path is the expected one: nothing to explain
        log.info("backend.cpu_engine auto: plain transformers, as %s", reason)
    return False


def install(model) -> None:
    """Give `model`'s layers the engine's attention, products and norms (inference only: with gradients
    enabled every changed layer runs its own forward)."""
    from selfreward.engine.attention import use_grouped_attention
    from selfreward.engine.norms import use_inplace_norms
    from selfreward.engine.onednn import use_onednn

    use_grouped_attention(model)
    use_onednn(model)
    use_inplace_norms(model)
