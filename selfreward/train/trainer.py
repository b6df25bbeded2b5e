"""What SFT and DPO share: trainer arguments from a recipe section, LoRA, checkpoints and resume, saving
M_{t+1} as one plain checkpoint (also from several processes), and running under `accelerate launch`.

Preemption: a resumable trainer checkpoint is saved every `save_steps` steps and every `save_minutes`
minutes (only the last is kept, in a hidden work folder beside the output); a rerun resumes from it; it is
deleted once the model is saved.

Several processes: with `launcher.num_processes > 1` the stage starts `accelerate launch` on
`selfreward.stages.worker`, which trains the same way in every process; only the main process writes the
model and the result, and the calling process marks the stage done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from selfreward.errors import UserError
from selfreward.models import load_causal_lm, load_tokenizer, save_checkpoint
from selfreward.precision import train_in_bf16
from selfreward.process_tree import child_env, tied
from selfreward.recipe import LauncherSection, TrainSection
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import append_jsonl, resume_records, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)


def precision_args(precision: str) -> dict[str, Any]:
    """bf16 autocast where the hardware computes it natively (see `precision`); on CPU, TRL needs use_cpu=True."""
    import torch

    return {"bf16": train_in_bf16(precision), "use_cpu": not torch.cuda.is_available()}


def trainer_args(config: TrainSection, work_dir: Path, seed: int, group_by_length: bool = False) -> dict[str, Any]:
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
        "save_strategy": "steps" if config.save_steps or config.save_minutes else "no",
        "save_steps": config.save_steps or 10**9,  # minutes only: the callback decides
        "save_total_limit": 1,
        "save_only_model": False,
        "logging_steps": 1,
        "report_to": list(config.report_to) or "none",
        "seed": seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **precision_args(config.precision),
    }


def checkpoint_callbacks(config: TrainSection) -> list:
    """Trainer callbacks for the part of the checkpoint schedule that TrainingArguments cannot express:
    a checkpoint once `save_minutes` have passed since the last one (or the start)."""
    if not config.save_minutes:
        return []
    from transformers import TrainerCallback

    class SaveEveryMinutes(TrainerCallback):
        def __init__(self, minutes: float) -> None:
            self.seconds = minutes * 60
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due = [time.monotonic() - self.last >= self.seconds]
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():  # every process must agree to save
                dist.broadcast_object_list(due, src=0)
            if due[0]:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()
            return control

    return [SaveEveryMinutes(config.save_minutes)]


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
    """The newest complete trainer checkpoint in `work_dir`, or None.

    A kill while a checkpoint is being written leaves a folder without its trainer state (written last);
    such folders are removed, so that training resumes from the previous, complete one.
    """
    if not work_dir.is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in work_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for _, folder in reversed(found):
        if _complete(folder):
            return str(folder)
        if is_main_process():
            log.warning("removing %s: written only in part (the run was stopped while saving it)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _complete(folder: Path) -> bool:
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def machine_rank() -> int:
    """This node's rank in a multi-node training job (set per node by the SLURM job script); 0 otherwise."""
    return int(os.environ.get("SELFREWARD_MACHINE_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_and_save(trainer, tokenizer, work_dir: Path, output: Path, model_path: str, trust_remote_code: bool = False,
                   log_path: Path | None = None, label: str = "training") -> dict[str, Any]:
    """Train (resuming from the last trainer checkpoint if any), save one plain checkpoint, clean up.

    The terminal shows one progress bar (`label`, the loss); the trainer's per-step records go to the JSONL
    `log_path` (see `train_log_callback`) and to the recipe's `report_to` integrations, never raw to stdout.

    Every process must call this (saving is collective under FSDP and ZeRO-3); only the main process
    writes `output`. With several processes the trainer gathers the full weights (`save_model`); LoRA
    adapters are merged into the base model, so `output` is always a plain HF checkpoint.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    resume = last_checkpoint(work_dir)
    if resume:
        log.info("resuming training from %s", resume)
    trainer.remove_callback(ProgressCallback)  # its bar prints every step's record as a raw dict
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(train_log_callback(log_path, label))
    trainer.train(resume_from_checkpoint=resume)
    if trainer.accelerator.num_processes > 1:
        _save_gathered(trainer, tokenizer, work_dir, output, model_path, trust_remote_code)
    else:
        model = trainer.model
        if hasattr(model, "merge_and_unload"):  # LoRA: M_{t+1} is a plain model, adapters merged
            model = model.merge_and_unload()
        model.generation_config = trainer.model.generation_config
        save_checkpoint(model, tokenizer, output)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(work_dir, ignore_errors=True)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "processes": trainer.accelerator.num_processes,
        # The mean of the logged step losses: the trainer's own figure counts only the steps of its last
        # process when training was resumed.
        "train_loss": round(sum(e["loss"] for e in history) / len(history), 4) if history else None,
        "first_loss": round(history[0]["loss"], 4) if history else None,
        "last_loss": round(history[-1]["loss"], 4) if history else None,
        "log": [step_record(entry) for entry in history],
    }


def step_record(entry: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step's logged figures (loss, learning rate, grad norm, DPO rewards, ...). `num_tokens`
    is a running count that TRL does not restore when training resumes: left out, so that a resumed run
    logs what an uninterrupted one does."""
    return {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_tokens"}


def train_log_callback(path: Path | None, label: str):
    """A `TrainLog` (below) for `path`; the class is made on first use, as transformers loads late."""
    from transformers import TrainerCallback

    class TrainLog(TrainerCallback):
        """A progress bar with the loss on the terminal (main process), and every step's record appended to
        `path` as JSON lines `{step, loss, learning_rate, ...}` (kept after the checkpoint is deleted). On a
        resumed run the records past the checkpoint's step, written before the interruption, are dropped
        first, so the file ends as an uninterrupted run's does."""

        def __init__(self, path: Path | None, label: str) -> None:
            self.path, self.label = path, label
            self.progress = self.task = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.path is not None:
                write_jsonl_atomic(self.path, [r for r in resume_records(self.path) if r["step"] <= state.global_step])
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=state.max_steps, completed=state.global_step, loss="-")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            if self.path is not None:
                append_jsonl(self.path, [{"step": state.global_step, **step_record(logs)}])
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, loss=f"{logs['loss']:.4f}")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return TrainLog(path, label)


def _save_gathered(trainer, tokenizer, work_dir: Path, output: Path, model_path: str, trust_remote_code: bool) -> None:
    """The full model from every process's shard (FSDP full state dict, ZeRO-3 gathered weights)."""
    gathered = work_dir / "gathered"
    trainer.save_model(str(gathered))  # collective; the main process writes
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    if (gathered / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_causal_lm(model_path, "float32", trust_remote_code)
        model = PeftModel.from_pretrained(base, str(gathered)).merge_and_unload()
    else:
        model = load_causal_lm(str(gathered), "float32", trust_remote_code)
    model.generation_config = trainer.model.generation_config
    save_checkpoint(model, tokenizer, output)


def launch(launcher: LauncherSection, stage: str, run_dir: Path, iteration: int) -> dict[str, Any]:
    """Run a training stage under `accelerate launch` with the recipe's processes; return its result.

    The worker processes read the run directory's recipe, train, and the main one writes the model and
    a result file; the caller marks the stage done. A failed launch is a UserError naming the stage.
    """
    result_path = run_dir / "launch" / f"{stage}-{iteration}.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(launcher.num_processes), "--num_machines", str(launcher.num_machines),
        "--main_process_port", str(launcher.main_process_port),
    ]
    if launcher.num_machines > 1:  # one launch per node (the SLURM jobs start one on each)
        command += ["--machine_rank", str(machine_rank()), "--main_process_ip", os.environ.get("SELFREWARD_MAIN_PROCESS_IP", "127.0.0.1")]
    if launcher.config_file:
        command += ["--config_file", launcher.config_file]
    else:
        # Plain DDP. On a CPU too: accelerate's --cpu starts several processes only through mpirun, while
        # --multi_gpu with the trainer's use_cpu=True gives N processes on the gloo backend.
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "selfreward.stages.worker", stage, str(run_dir), str(iteration), str(result_path)]
    log.info("%s: %s", stage, " ".join(command))
    # accelerate launch and its workers die with this process and hold the stage's worker lock while they live.
    key = stage if iteration == 0 else f"iter{iteration}/{stage}"
    completed = subprocess.run(tied(command), check=False, env=child_env(RunDir(run_dir).workers_lock(key)))
    if completed.returncode != 0 or not result_path.is_file():
        raise UserError(f"{stage}: training under accelerate launch failed (exit code {completed.returncode}); "
                        "its log is above; rerun to resume from the last checkpoint")
    return json.loads(result_path.read_text(encoding="utf-8"))


def write_result(path: Path, result: dict[str, Any]) -> None:
    """The worker's result, for the process that launched it (main process only)."""
    if is_main_process():
        write_json_atomic(path, result)

