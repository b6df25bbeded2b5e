"""DPO: M_t → M_{t+1} on the iteration's preference pairs, with M_t as the reference model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.jsonl import read_jsonl
from selfreward.training import load_for_training, lora_config, train_and_save, trainer_args

log = logging.getLogger(__name__)
PAIR_FIELDS = {"prompt": list, "chosen": list, "rejected": list}


def run_dpo(
    model_path: str, pairs_path: Path, config, output: Path, seed: int = 0, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Train M_{t+1} from `model_path` (= M_t, also the reference) on `pairs_path`; save to `output`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    pairs = read_jsonl(pairs_path, PAIR_FIELDS)
    if not pairs:
        raise UserError(
            f"{pairs_path}: no preference pairs to train on (every prompt tied or was unscored); "
            "raise prompts.count, responses.n or judge.samples"
        )
    model, tokenizer = load_for_training(model_path, trust_remote_code)
    columns = [{key: record[key] for key in PAIR_FIELDS} for record in pairs]
    dataset = Dataset.from_list(columns).shuffle(seed=seed)
    work_dir = output.parent / f".{output.name}.work"
    args = DPOConfig(**trainer_args(config, work_dir, seed), beta=config.beta, loss_type=list(config.loss_type))
    # ref_model=None: with LoRA the reference is the adapter-free model; without, TRL loads M_t again
    # from model_path, which is exactly the reference the method asks for.
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora_config(config),
    )
    result = train_and_save(trainer, tokenizer, work_dir, output)
    result.update(pairs=len(dataset), seconds=round(time.perf_counter() - started, 1))
    log.info("DPO: %d pairs, loss %s → %s, %.0f s", len(dataset), result["first_loss"], result["last_loss"], result["seconds"])
    return result
