"""(d) SFT speed before and after the LM-head change, at equal loss, side by side in one run.

    python -m benchmarks.sft_speed --model embedded:gemma3-270m

Rows, each in its own process on the same seed data, seed and settings (the demo recipe's SFT section):
- `trl head`: TRL's fused LM head as shipped (on a CPU it projects every position, prompts included);
- `labels-only head`: ours (`selfreward.train.completion_head`): only positions whose label counts are projected;
- `+ allocator keeps freed memory`: and glibc keeps freed memory for reuse (`selfreward.allocator`, what
  every `selfreward` command does) instead of paging large tensors in again at every step;
- `+ no activation checkpointing`: and no activation checkpointing (the demo recipe's
  `gradient_checkpointing: false`; a 270M model's activations fit in memory many times over);
- `+ packing`: and examples packed without padding into one row of `max_length` tokens per micro-batch
  (`sft.packing`, ~3.5 demo examples a row against 4 padded ones): its steps hold other examples, so its
  losses are compared by their mean over the epoch, not step by step.
Per row: training seconds (first step to last), tokens/s (every token of every batch, prompts included,
as TRL counts them), MFU (tokens/s x 6 x parameters / the matmul rate measured in this run), the share
of CPU time spent in the kernel, peak memory, and the largest difference of any logged step loss from the
first row's (equal loss curves = the change is only about speed; left empty where the steps differ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    COMPUTE_DTYPE,
    cpu_times,
    cudnn_attention,
    device_name,
    matmul_gflops,
    mfu,
    parameters,
    peak_cuda_gib,
    peak_rss_gib,
    report,
    synchronize,
)

ROWS = {
    "trl head": {"labels_only": False, "keep_freed_memory": False, "gradient_checkpointing": True},
    "labels-only head": {"labels_only": True, "keep_freed_memory": False, "gradient_checkpointing": True},
    "+ allocator keeps freed memory": {"labels_only": True, "keep_freed_memory": True, "gradient_checkpointing": True},
    "+ no activation checkpointing": {"labels_only": True, "keep_freed_memory": True, "gradient_checkpointing": False},
    "+ packing": {"labels_only": True, "keep_freed_memory": True, "gradient_checkpointing": False, "packing": True},
}


def child(name: str, args) -> dict:
    """Train once with the row's settings; return its measurements (run in a fresh process)."""
    from transformers import TrainerCallback

    from selfreward.allocator import keep_freed_memory
    from selfreward.data.seeds import load_seeds
    from selfreward.judge import load_judge_template
    from selfreward.recipe import load_recipe
    from selfreward.stages.sft import run_sft
    from selfreward.train import completion_head

    cudnn_attention(not args.no_cudnn_attention)
    recipe = load_recipe(Path(args.recipe))
    settings = ROWS[name]
    if settings["keep_freed_memory"]:
        keep_freed_memory()
    update = {"gradient_checkpointing": settings["gradient_checkpointing"], "epochs": args.epochs, "save_steps": None, "save_minutes": None}
    if settings.get("packing"):
        update.update(packing=True, batch_size=1)
    config = recipe.sft.model_copy(update=update)
    ift, eft, _ = load_seeds(recipe.data, recipe.seed, recipe.limits)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.first = self.last = None
            self.tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first is None:
                synchronize()
                self.first = time.perf_counter()
                self.cpu = cpu_times()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.last = time.perf_counter()
            self.cpu_end = cpu_times()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.tokens = max(self.tokens, int((logs or {}).get("num_tokens", 0)))

    clock = Clock()
    head = completion_head.install if settings["labels_only"] else (lambda trainer: False)
    with tempfile.TemporaryDirectory() as folder:
        result = run_sft(args.model, ift, eft, load_judge_template(), config, Path(folder) / "m1", recipe.seed,
                         callbacks=[clock], lm_head=head)
    seconds = clock.last - clock.first
    user, system = (b - a for a, b in zip(clock.cpu, clock.cpu_end))
    return {"row": name, "steps": result["steps"], "train_s": seconds, "tokens": clock.tokens, "tok_per_s": clock.tokens / seconds,
            "system_cpu_share": system / (user + system), "peak_rss_gib": peak_rss_gib(),
            "peak_cuda_gib": peak_cuda_gib(), "losses": [e["loss"] for e in result["log"]], "mean_loss": result["train_loss"], "labels_only_head": result["lm_head_on_labels_only"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--recipe", default="recipes/demo-cpu.yaml", help="whose data and sft sections to use")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--only", default="", help="rows to run, separated by ';'")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="keep attention off cuDNN (a GPU experiment)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/sft_speed.json"))
    args = parser.parse_args()
    from selfreward.models import resolve_model

    args.model = resolve_model(args.model)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    gflops = matmul_gflops()
    params = parameters(args.model)["total"]
    names = [n for n in ROWS if not args.only or n in args.only.split(";")]
    rows = []
    for name in names:
        command = [sys.executable, "-m", "benchmarks.sft_speed", "--child", name, "--model", args.model, "--recipe", args.recipe,
                   "--epochs", str(args.epochs)] + ["--no-cudnn-attention"] * args.no_cudnn_attention
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["mfu"] = mfu(row["tok_per_s"], 6 * params, gflops)
        row["speedup"] = row["tok_per_s"] / rows[0]["tok_per_s"]
        same_steps = len(row["losses"]) == len(rows[0]["losses"])
        row["max_loss_diff"] = max((abs(a - b) for a, b in zip(row["losses"], rows[0]["losses"])), default=None) if same_steps else None
    losses = {row["row"]: row.pop("losses") for row in rows}
    report("(d) SFT: tokens per second before and after the LM-head change", rows, args.output, {
        "model": args.model, "recipe": args.recipe, "epochs": args.epochs, "parameters": params,
        "matmul_gflops": round(gflops, 1), "dtype": COMPUTE_DTYPE, "device": device_name(), "cudnn_attention": cudnn_attention(not args.no_cudnn_attention),
        "losses": losses, "command": " ".join(sys.argv),
    })


if __name__ == "__main__":
    main()
