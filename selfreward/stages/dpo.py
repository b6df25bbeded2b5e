"""DPO: M_t → M_{t+1} on the iteration's preference pairs, with M_t as the reference model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.models import resolve_model
from selfreward.recipe import DpoSection
from selfreward.run.jsonl import read_jsonl
from selfreward.stages.context import StageContext
from selfreward.train import completion_head, consistency
from selfreward.train.trainer import checkpoint_callbacks, load_for_training, lora_config, train_and_save, trainer_args

log = logging.getLogger(__name__)
PAIR_FIELDS = {"prompt": list, "chosen": list, "rejected": list}


def run_dpo(
    model_path: str,
    pairs_path: Path,
    config: DpoSection,
    output: Path,
    seed: int = 0,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
    lm_head=completion_head.install,
    log_path: Path | None = None,
    judge_pairs_path: Path | None = None,
) -> dict[str, Any]:
    """Train M_{t+1} from `model_path` (= M_t, also the reference) on `pairs_path` (and the meta-judge's
    `judge_pairs_path`, trained alike); save to `output`.
    `lm_head(trainer)` may replace TRL's LM head and says whether it did (see `completion_head`).

    The result names the policy's starting weights and the reference model as the trainer holds them.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    pairs = read_jsonl(pairs_path, PAIR_FIELDS)
    judge_pairs = read_jsonl(judge_pairs_path, PAIR_FIELDS) if judge_pairs_path else []
    if not pairs:
        raise UserError(
            f"{pairs_path}: no preference pairs to train on (every prompt tied or was unscored); "
            "raise prompts.count, responses.n or judge.samples"
        )
    model, tokenizer = load_for_training(model_path, trust_remote_code)
    peft_config = lora_config(config)
    # The reference is M_t: with LoRA the adapter-disabled model; without, a frozen copy loaded here (TRL
    # would reload it from the config's _name_or_path, which need not be M_t's directory).
    ref_model = None if peft_config else load_for_training(model_path, trust_remote_code)[0]
    # CREAM: answer pairs from iteration 2 on carry their consistency C (recipe dpo.consistency_weighting);
    # judge pairs have no second ranking and train unweighted (C = 1).
    weighted = config.consistency_weighting and any(consistency.COLUMN in record for record in pairs)
    columns = [{key: record[key] for key in PAIR_FIELDS} for record in pairs + judge_pairs]
    if weighted:
        for column, record in zip(columns, pairs + judge_pairs):
            column[consistency.COLUMN] = record.get(consistency.COLUMN, 1.0)
    dataset = Dataset.from_list(columns).shuffle(seed=seed)
    work_dir = output.parent / f".{output.name}.work"
    args = DPOConfig(**trainer_args(config, work_dir, seed), beta=config.beta, loss_type=list(config.loss_type),
                     loss_weights=config.loss_weights, ld_alpha=config.ld_alpha,
                     precompute_ref_log_probs=config.precompute_ref_log_probs)
    trainer_class = consistency.make_trainer_class() if weighted else DPOTrainer
    trainer = trainer_class(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=checkpoint_callbacks(config) + list(callbacks or []),
    )
    label_positions_only = lm_head(trainer)
    reference = model_path if peft_config else trainer.ref_model.config._name_or_path
    result = train_and_save(trainer, tokenizer, work_dir, output, model_path, trust_remote_code, log_path, "DPO")
    if config.consistency_weighting:
        result["consistency_weighted"] = weighted
    if judge_pairs_path:
        result["judge_pairs"] = len(judge_pairs)
    result.update(pairs=len(dataset), lm_head_on_labels_only=label_positions_only, policy=model_path, reference=reference, seconds=round(time.perf_counter() - started, 1))
    log.info("DPO: %d pairs, loss %s → %s, %.0f s", len(dataset), result["first_loss"], result["last_loss"], result["seconds"])
    return result


def train(ctx: StageContext) -> dict[str, Any]:
    """The DPO stage's work in this process (one of several under `accelerate launch`)."""
    t, recipe = ctx.iteration, ctx.recipe
    return run_dpo(resolve_model(ctx.current_model), ctx.run_dir.pairs(t), recipe.dpo, ctx.run_dir.model(t), recipe.seed,
                   recipe.model.trust_remote_code, log_path=ctx.run_dir.dpo_log(t),
                   judge_pairs_path=ctx.run_dir.judge_pairs(t) if recipe.meta_judge.enabled else None)
