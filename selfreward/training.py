"""What SFT and DPO share: trainer arguments from a recipe section, LoRA, resume, saving M_{t+1}."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from selfreward.models import load_causal_lm, load_tokenizer, save_checkpoint

log = logging.getLogger(__name__)


def precision_args(precision: str) -> dict[str, Any]:
    """bf16 where the hardware has it; on CPU, TRL needs use_cpu=True (bf16 autocast still helps there)."""
    import torch

    on_gpu = torch.cuda.is_available()
    bf16 = precision == "bf16" or precision == "auto" and (not on_gpu or torch.cuda.is_bf16_supported())
    return {"bf16": bf16, "use_cpu": not on_gpu}


def trainer_args(config, work_dir: Path, seed: int, group_by_length: bool = False) -> dict[str, Any]:
    """Keyword arguments common to SFTConfig and DPOConfig, from a recipe's training section."""
    return {
        "output_dir": str(work_dir),
        "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "lr_scheduler_kwargs": dict(config.lr_scheduler_kwargs),
        "warmup_steps": config.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        "max_length": config.max_length,
        "gradient_checkpointing": config.gradient_checkpointing,
        "train_sampling_strategy": "group_by_length" if group_by_length else "random",
        "save_strategy": "steps" if config.save_steps else "no",
        "save_steps": config.save_steps or 500,
        "save_only_model": False,
        "logging_steps": 1,
        "report_to": "none",
        "seed": seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **precision_args(config.precision),
    }


def lora_config(config):
    if not config.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_for_training(model_path: str, trust_remote_code: bool):
    # fp32 master weights; bf16 comes from autocast (TrainingArguments.bf16).
    return load_causal_lm(model_path, "float32", trust_remote_code), load_tokenizer(model_path, trust_remote_code)


def last_checkpoint(work_dir: Path) -> str | None:
    if not work_dir.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(work_dir))


def train_and_save(trainer, tokenizer, work_dir: Path, output: Path) -> dict[str, Any]:
    """Train (resuming from the last trainer checkpoint if any), save a plain merged checkpoint, clean up."""
    resume = last_checkpoint(work_dir)
    if resume:
        log.info("resuming training from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA: M_{t+1} is a plain model, adapters merged
        model = model.merge_and_unload()
    model.generation_config = trainer.model.generation_config
    save_checkpoint(model, tokenizer, output)
    shutil.rmtree(work_dir, ignore_errors=True)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "first_loss": round(history[0]["loss"], 4) if history else None,
        "last_loss": round(history[-1]["loss"], 4) if history else None,
        "log": [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in history],
    }
