"""SFT: M0 → M1 on instruction-following (IFT) and evaluation (EFT) seed data.

EFT examples are the judge prompt filled with an instruction and a response, answered by a short
justification ending in `Score: N`: this is what teaches the model to judge.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.judge import JudgeItem, render_judge_prompt
from selfreward.training import load_for_training, lora_config, train_and_save, trainer_args

log = logging.getLogger(__name__)


def sft_examples(ift: list[dict], eft: list[dict], judge_template: str) -> list[dict[str, Any]]:
    """Conversational prompt/completion records (TRL trains on the completion only)."""
    examples = [
        {"prompt": [{"role": "user", "content": r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in ift
    ]
    examples += [
        {"prompt": [{"role": "user", "content": render_judge_prompt(judge_template, JudgeItem(r["instruction"], r["response"]))}],
         "completion": [{"role": "assistant", "content": r["judgment"]}]}
        for r in eft
    ]
    return examples


def run_sft(
    model_path: str,
    ift: list[dict],
    eft: list[dict],
    judge_template: str,
    config,
    output: Path,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Fine-tune `model_path` on IFT + EFT seed data; save M1 to `output` (a plain HF checkpoint)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    model, tokenizer = load_for_training(model_path, trust_remote_code)
    dataset = Dataset.from_list(sft_examples(ift, eft, judge_template)).shuffle(seed=seed)
    work_dir = output.parent / f".{output.name}.work"
    args = SFTConfig(**trainer_args(config, work_dir, seed, config.group_by_length), completion_only_loss=True, packing=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(config)
    )
    result = train_and_save(trainer, tokenizer, work_dir, output)
    result.update(examples=len(dataset), ift=len(ift), eft=len(eft), seconds=round(time.perf_counter() - started, 1))
    log.info("SFT: %d examples, loss %s → %s, %.0f s", len(dataset), result["first_loss"], result["last_loss"], result["seconds"])
    return result
