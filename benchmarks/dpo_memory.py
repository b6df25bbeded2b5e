"""(c) DPO, side by side in one run on the same pairs, model and settings: TRL's defaults with a separate
reference model vs LoRA with the adapter-disabled model as the reference vs LoRA with the reference
log-probabilities precomputed; seconds per step and peak memory.

    python -m benchmarks.dpo_memory --model embedded:gemma3-270m

Rows, each trained in its own child process so that its peak memory is its own:

- `trl-default`: full fine-tuning with `DPOTrainer` and `DPOConfig` as shipped, the reference a second
  float32 copy of the model; only what this run needs is set (output folder, CPU, no reporting or saving,
  and the batch size, max length, steps, learning rate and seed shared by every row).
- `lora-adapter-ref`: our DPO stage (`selfreward.stages.dpo.run_dpo`) with LoRA r=16, alpha=32: the
  reference is the policy with its adapter disabled.
- `lora-precomputed-ref`: the same with `precompute_ref_log_probs=True`: the reference log-probabilities
  of every pair are computed once before training (counted in `setup_s`), not in every step.

Per row: timed optimizer steps, median seconds per step after the first, the first step, setup (process
start to the first step: imports, loading, precomputing), peak resident memory at the end of the child and
at the end of training (before run_dpo merges and saves the model), on a GPU the peak CUDA memory, the
ratios to `trl-default`, and MFU = tokens/s x 6 x parameters / the matmul rate measured once at the
start. Tokens per step = prompt+chosen plus prompt+rejected tokens (chat template, cut at --max-length),
the mean over the pairs times the batch size. 6 x all parameters is the convention for every row, LoRA
included, and the reference model's forward pass is not counted.

The goal checked by this benchmark: LoRA with the adapter-disabled reference at <= 0.6x the peak memory of
TRL's default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import COMPUTE_DTYPE, device_name, matmul_gflops, mfu, parameters, peak_cuda_gib, peak_rss_gib, report, synchronize

ROWS = ("trl-default", "lora-adapter-ref", "lora-precomputed-ref")
IFT = Path(__file__).resolve().parent.parent / "data" / "ift.jsonl"
SEED = 0
# Every row takes an optimizer step per batch: the step count and the peak memory then describe one batch.
GRADIENT_ACCUMULATION_STEPS = 1


# ---------------------------------------------------------------------------------------------- the pairs


def synthetic_pairs(count: int) -> list[dict]:
    """Deterministic pairs from the repo's IFT data: chosen = the instruction's own response, rejected = the
    response to another instruction without its last sentence (off topic and a little shorter)."""
    from selfreward.run.jsonl import read_jsonl

    records = read_jsonl(IFT, {"instruction": str, "response": str})
    pairs = []
    for i in range(count):
        record, other = records[i % len(records)], records[(i + 7) % len(records)]
        sentences = other["response"].split(". ")
        rejected = ". ".join(sentences[:-1]) + "." if len(sentences) > 1 else other["response"]
        pairs.append({
            "prompt": [{"role": "user", "content": record["instruction"]}],
            "chosen": [{"role": "assistant", "content": record["response"]}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return pairs


def load_pairs(path: str | None, count: int) -> list[dict]:
    if path is None:
        return synthetic_pairs(count)
    from selfreward.run.jsonl import read_jsonl
    from selfreward.stages.dpo import PAIR_FIELDS

    return [{key: pair[key] for key in PAIR_FIELDS} for pair in read_jsonl(path, PAIR_FIELDS)[:count]]


def tokens_per_pair(model_path: str, pairs: list[dict], max_length: int) -> float:
    """Mean prompt+chosen plus prompt+rejected tokens of a pair, as the DPO collator feeds them (chat
    template, each sequence cut at `max_length`); the same count for every row."""
    from selfreward.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)

    def length(messages: list[dict]) -> int:
        return min(len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]), max_length)

    return statistics.mean(length(p["prompt"] + p["chosen"]) + length(p["prompt"] + p["rejected"]) for p in pairs)


def epochs_for(steps: int, pairs: int, batch_size: int) -> float:
    """num_train_epochs that gives exactly `steps` optimizer steps: the trainer takes ceil(epochs x steps per
    epoch), and run_dpo has epochs, not max_steps (half a step below the target keeps float error out)."""
    per_epoch = math.ceil(pairs / (batch_size * GRADIENT_ACCUMULATION_STEPS))
    return (steps - 0.5) / per_epoch


# ----------------------------------------------------------------------------------- the child processes


def step_timer():
    """A trainer callback timing each optimizer step (synchronising a GPU first, so that a step's time is
    its own) and noting when the first step began and the peak memory when training ended."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.first_step_at: float | None = None  # wall clock, to compare with the process start
            self.began = 0.0
            self.durations: list[float] = []
            self.peak_rss_train_gib: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            if self.first_step_at is None:
                self.first_step_at = time.time()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.durations.append(time.perf_counter() - self.began)

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_rss_train_gib = peak_rss_gib()

    return StepTimer()


def train_trl_default(args, timer, work: Path) -> dict:
    """DPOTrainer with DPOConfig's defaults and a separate reference model: TRL as shipped (no
    selfreward.train.completion_head)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from selfreward.models import load_tokenizer
    from selfreward.run.jsonl import read_jsonl
    from selfreward.stages.dpo import PAIR_FIELDS

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # selfreward's tokenizer loader (chat template ensured, pad token set) so that every row trains on the
    # same token ids; it has no bearing on the trainer's speed or memory.
    tokenizer = load_tokenizer(args.model)
    dataset = Dataset.from_list(read_jsonl(args.pairs, PAIR_FIELDS)).shuffle(seed=SEED)  # as run_dpo shuffles
    config = DPOConfig(
        output_dir=str(work / "trainer"), report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
        max_length=args.max_length, num_train_epochs=args.epochs, learning_rate=args.learning_rate, seed=SEED,
        gradient_checkpointing=args.gradient_checkpointing, **({} if torch.cuda.is_available() else {"use_cpu": True}),
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"completion_head": False}


def train_ours(args, timer, work: Path, precompute: bool) -> dict:
    """Our DPO stage with LoRA: the reference is the adapter-disabled policy, or precomputed log-probs."""
    from selfreward.recipe import DpoSection
    from selfreward.stages.dpo import run_dpo

    config = DpoSection(
        batch_size=args.batch_size, gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
        max_length=args.max_length, epochs=args.epochs, learning_rate=args.learning_rate,
        gradient_checkpointing=args.gradient_checkpointing, save_steps=None, save_minutes=None,
        lora={"enabled": True, "r": 16, "alpha": 32}, precompute_ref_log_probs=precompute,
    )
    result = run_dpo(args.model, Path(args.pairs), config, work / "model", SEED, callbacks=[timer])
    return {"completion_head": result["lm_head_on_labels_only"]}


def child(args) -> None:
    """Train one row and write its measurements as one JSON line on stdout (everything else the trainers
    print goes to stderr, so that the parent reads only that line)."""
    import psutil

    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="dpo-memory-") as folder, contextlib.redirect_stdout(sys.stderr):
        work = Path(folder)
        if args.child == "trl-default":
            extra = train_trl_default(args, timer, work)
        else:
            extra = train_ours(args, timer, work, precompute=args.child == "lora-precomputed-ref")
    durations = timer.durations
    row = {
        "config": args.child,
        "steps": len(durations),
        "s_per_step": statistics.median(durations[1:]) if len(durations) > 1 else None,
        "first_step_s": durations[0] if durations else None,
        "setup_s": timer.first_step_at - psutil.Process().create_time() if timer.first_step_at else None,
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_train_gib": timer.peak_rss_train_gib,
    }
    if peak_cuda_gib() is not None:
        row["peak_cuda_gib"] = peak_cuda_gib()
    sys.stdout.write(json.dumps({**row, **extra}) + "\n")


# ------------------------------------------------------------------------------------------------ the parent


def run_child(name: str, args, model_path: str, pairs_path: Path, epochs: float) -> dict:
    command = [
        sys.executable, "-m", "benchmarks.dpo_memory", "--child", name, "--model", model_path,
        "--pairs", str(pairs_path), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--epochs", repr(epochs), "--learning-rate", repr(args.learning_rate),
    ]
    if not args.gradient_checkpointing:
        command.append("--no-gradient-checkpointing")
    # The child's stderr (trainer progress, warnings, a traceback) passes through to ours.
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if completed.returncode != 0 or not lines:
        return {"config": name, "error": f"child exited with code {completed.returncode} (its stderr is above)"}
    return json.loads(lines[-1])


def add_ratios(rows: list[dict], tokens_per_step: float, flops_per_token: float, gflops: float, memory_key: str) -> None:
    """Ratios to trl-default (peak memory by `memory_key`), tokens/s and MFU, in place."""
    base = next((r for r in rows if r["config"] == "trl-default" and "error" not in r), None)

    def ratio(row: dict, key: str) -> float | None:
        if base is None or row.get(key) is None or not base.get(key):
            return None
        return row[key] / base[key]

    for row in rows:
        if "error" in row:
            continue
        row["ratio_peak_vs_trl_default"] = ratio(row, memory_key)
        row["ratio_s_per_step_vs_trl_default"] = ratio(row, "s_per_step")
        row["tok_per_s"] = tokens_per_step / row["s_per_step"] if row["s_per_step"] else None
        row["mfu"] = mfu(row["tok_per_s"], flops_per_token, gflops) if row["tok_per_s"] else None


def versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def parent(args) -> None:
    import torch

    from selfreward.models import resolve_model

    only = [name.strip() for name in args.only.split(",")] if args.only else list(ROWS)
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown rows {', '.join(unknown)} (known: {', '.join(ROWS)})")
    model_path = resolve_model(args.model)
    pairs = load_pairs(args.pairs, args.count)
    epochs = epochs_for(args.steps, len(pairs), args.batch_size)
    tokens_per_step = tokens_per_pair(model_path, pairs, args.max_length) * args.batch_size * GRADIENT_ACCUMULATION_STEPS
    params = parameters(model_path)
    gflops = matmul_gflops()  # before any child runs, on an idle process
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="dpo-memory-pairs-") as folder:
        # One pairs file for every child: the same pairs, in the same order.
        pairs_path = Path(folder) / "pairs.jsonl"
        pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        rows = [run_child(name, args, model_path, pairs_path, epochs) for name in only]
    memory_key = "peak_cuda_gib" if on_gpu else "peak_rss_gib"
    add_ratios(rows, tokens_per_step, 6 * params["total"], gflops, memory_key)
    report("(c) DPO: TRL defaults vs LoRA with the adapter-disabled reference vs precomputed reference log-probs",
           rows, args.output, {
               "model": args.model, "model_path": model_path,
               "pairs": len(pairs), "pairs_source": args.pairs or f"synthetic from {IFT.relative_to(IFT.parent.parent)}",
               "batch_size": args.batch_size, "gradient_accumulation_steps": GRADIENT_ACCUMULATION_STEPS,
               "max_length": args.max_length, "max_steps": args.steps, "num_train_epochs": epochs,
               "learning_rate": args.learning_rate, "gradient_checkpointing": args.gradient_checkpointing,
               "device": device_name(),
               "tokens_per_step": round(tokens_per_step, 1), "parameters": params,
               "matmul_gflops": round(gflops, 1), "dtype": COMPUTE_DTYPE,
               "flops_convention": "6 x total parameters per token for every row, LoRA included; the reference "
                                   "forward pass is not counted",
               "ratio_peak_measure": memory_key, "versions": versions(),
               "command": shlex.join([sys.executable, "-m", "benchmarks.dpo_memory", *sys.argv[1:]]),
           })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Rows: " + ", ".join(ROWS) + ". See the module docstring.")
    parser.add_argument("--model", default="embedded:gemma3-270m", help="model to train (embedded:NAME, folder or hub id)")
    parser.add_argument("--pairs", help="preference pairs (JSONL: prompt, chosen, rejected as chat messages); "
                                        "default: synthetic pairs from data/ift.jsonl")
    parser.add_argument("--count", type=int, default=16, help="pairs to train on")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (no accumulation)")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per prompt+completion sequence")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per row")
    parser.add_argument("--learning-rate", type=float, default=1e-6, help="DPOConfig's and DpoSection's default")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="turn it off in every row (on by default in DPOConfig and DpoSection)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/dpo_memory.json"), help="JSON results")
    parser.add_argument("--only", help="comma-separated rows to run (default: all)")
    # Internal: the parent starts one child per row with these.
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
