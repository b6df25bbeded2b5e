"""SFT: M0 → M1 on instruction-following (IFT) and evaluation (EFT) seed data.

EFT examples are the judge prompt filled with an instruction and a response, answered by a short
justification ending in `Score: N`: this is what teaches the model to judge.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.data.seeds import load_seeds
from selfreward.judge import JudgeItem, load_judge_template, render_judge_prompt
from selfreward.models import resolve_model
from selfreward.recipe import SftSection
from selfreward.stages.context import StageContext
from selfreward.train import completion_head
from selfreward.train.trainer import checkpoint_callbacks, load_for_training, lora_config, train_and_save, trainer_args
from selfreward.train.turn_end import init_turn_end

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
    config: SftSection,
    output: Path,
    seed: int = 0,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
    lm_head=completion_head.install,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune `model_path` on IFT + EFT seed data; save M1 to `output` (a plain HF checkpoint).

    Resumes from the last trainer checkpoint in the work folder beside `output`. `callbacks` are extra
    trainer callbacks (tests use one to stop training at a given step). `lm_head(trainer)` may replace
    TRL's LM head and says whether it did (benchmarks pass one that keeps TRL's).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    model, tokenizer = load_for_training(model_path, trust_remote_code)
    turn_end = init_turn_end(model, tokenizer, ift) if config.init_turn_end else None
    dataset = Dataset.from_list(sft_examples(ift, eft, judge_template)).shuffle(seed=seed)
    work_dir = output.parent / f".{output.name}.work"
    # Packed rows are all about `max_length` long: grouping them by length would change nothing.
    args = SFTConfig(**trainer_args(config, work_dir, seed, config.group_by_length and not config.packing),
                     completion_only_loss=True, packing=config.packing, packing_strategy="bfd")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(config),
        callbacks=checkpoint_callbacks(config) + list(callbacks or []),
    )
    label_positions_only = lm_head(trainer)
    result = train_and_save(trainer, tokenizer, work_dir, output, model_path, trust_remote_code, log_path, "SFT")
    result.update(examples=len(dataset), lm_head_on_labels_only=label_positions_only, turn_end=turn_end, ift=len(ift), eft=len(eft), seconds=round(time.perf_counter() - started, 1))
    log.info("SFT: %d examples, loss %s → %s, %.0f s", len(dataset), result["first_loss"], result["last_loss"], result["seconds"])
    return result


def train(ctx: StageContext, trainer=None, resolve=resolve_model) -> dict[str, Any]:
    """The SFT stage's work in this process (one of several under `accelerate launch`): the seed data cut
    to the recipe's limits (counted in the result) goes to `trainer` (default `run_sft`)."""
    recipe = ctx.recipe
    ift, eft, truncated = load_seeds(recipe.data, recipe.seed, recipe.limits)
    judge_template = load_judge_template(recipe.judge.template)
    result = (trainer or run_sft)(resolve(recipe.model.base), ift, eft, judge_template, recipe.sft, ctx.run_dir.sft_model,
                                  recipe.seed, recipe.model.trust_remote_code, log_path=ctx.run_dir.sft_log)
    return {**result, "truncated": truncated}
