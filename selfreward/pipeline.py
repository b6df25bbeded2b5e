"""The self-rewarding loop of Yuan et al. (2024), top to bottom.

    M1 = SFT(M0, IFT + EFT seed data)
    for t = 1 .. T:
        prompts    = self-instruct(M_t, IFT seed instructions)
        candidates = M_t answers each prompt N times
        judgments  = M_t judges each candidate k times; score = mean of parseable scores
        pairs      = best vs worst candidate per prompt; ties dropped
        M_{t+1}    = DPO(M_t, pairs), reference M_t

Each `stage_*` function below runs one stage against the run directory: it skips a finished stage,
resumes a half-finished one, and marks it done only once its outputs are complete. The CLI's per-stage
commands call the same functions, so a cluster job can run one stage each.
"""

from __future__ import annotations

import logging
from statistics import mean
from typing import Any

from pathlib import Path

from selfreward.backends import Backend, Sampling, open_backend
from selfreward.evaluation import evaluate_judge
from selfreward.judge import Judge
from selfreward.errors import UserError
from selfreward.jsonl import read_jsonl, write_json_atomic
from selfreward.models import check_model_reference, resolve_model
from selfreward.recipe import Recipe
from selfreward.rundir import RunDir
from selfreward.seeds import load_eft, load_ift, load_seeds
from selfreward.stages.dpo import run_dpo
from selfreward.stages.generate import run_generate
from selfreward.stages.judging import run_judging
from selfreward.stages.pairs import run_pairs
from selfreward.stages.prompts import run_prompts
from selfreward.stages.sft import run_sft
from selfreward.templates import load_template

log = logging.getLogger(__name__)
ITERATION_STAGES = ("prompts", "responses", "judgments", "pairs", "dpo")


class Models:
    """Opens a model in the recipe's backend on first use and keeps at most one open.

    Stages of one iteration that use M_t share one load; nothing is loaded for stages already done, and
    the model is closed before training so generation and training never hold the accelerator together.
    """

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.ref: str | None = None
        self.backend: Backend | None = None

    def get(self, ref: str) -> Backend:
        if self.backend is None or self.ref != ref:
            self.close()
            self.backend = open_backend(
                resolve_model(ref), self.recipe.backend, self.recipe.seed, self.recipe.model.trust_remote_code
            )
            self.ref = ref
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend, self.ref = None, None

    def __enter__(self) -> Models:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(recipe: Recipe, run_dir: RunDir) -> list[dict[str, Any]]:
    """SFT, then `recipe.iterations` self-rewarding iterations; returns one metrics record per iteration."""
    warn_remote_code(recipe)
    run_dir.bind_recipe(recipe)
    if recipe.sft.enabled:
        stage_sft(recipe, run_dir)
    with Models(recipe) as models:
        for t in range(1, recipe.iterations + 1):
            stage_prompts(recipe, run_dir, t, models)
            stage_responses(recipe, run_dir, t, models)
            stage_judgments(recipe, run_dir, t, models)
            stage_judge_eval(recipe, run_dir, t, models)
            stage_pairs(recipe, run_dir, t)
            models.close()
            stage_dpo(recipe, run_dir, t)
            write_metrics(run_dir, t)
    return [iteration_metrics(run_dir, t) for t in range(1, recipe.iterations + 1)]


def check_inputs(recipe: Recipe, source: str) -> None:
    """Every file and model the recipe names exists: checked before any work starts and before the run
    directory is created, so that a typo costs a second rather than an SFT run."""
    files = {
        "data.ift": recipe.data.ift, "data.eft": recipe.data.eft, "prompts.template": recipe.prompts.template,
        "judge.template": recipe.judge.template, "evaluation.ranked": recipe.evaluation.ranked,
        "evaluation.pairs": recipe.evaluation.pairs,
    }
    oasst1 = recipe.data.oasst1
    if oasst1 and (Path(oasst1).suffix in {".jsonl", ".json", ".parquet", ".gz"} or oasst1.startswith((".", "/", "~"))):
        files["data.oasst1"] = oasst1  # a local file, not a hub id
    for key, value in files.items():
        if value is not None and not Path(value).expanduser().exists():
            raise UserError(f"{source}: {key}: '{value}' not found (relative paths start from {Path.cwd()})")
    for key, ref in (("model.base", recipe.model.base), ("prompts.model", recipe.prompts.model)):
        try:
            if ref:
                check_model_reference(ref)
        except UserError as error:
            raise UserError(f"{source}: {key}: {error}") from None
    # Seed files are small: read them whole now, so a bad line is reported before the run starts.
    if recipe.data.ift and not load_ift(recipe.data.ift) and not recipe.data.oasst1:
        raise UserError(f"{recipe.data.ift}: empty file: no IFT seed examples")
    if recipe.data.eft:
        load_eft(recipe.data.eft)


def warn_remote_code(recipe: Recipe) -> None:
    """Put it in the run log when the recipe lets model repositories run their own Python code here."""
    if recipe.model.trust_remote_code:
        models = [recipe.model.base] + ([recipe.prompts.model] if recipe.prompts.model else [])
        log.warning("model.trust_remote_code is on: code from %s will be executed", " and ".join(models))


def _skip(run_dir: RunDir, stage: str) -> dict | None:
    record = run_dir.done_record(stage)
    if record is not None:
        log.info("%s: already done, skipping", stage)
    return record


def _require(run_dir: RunDir, stage: str, hint: str) -> None:
    if not run_dir.is_done(stage):
        raise UserError(f"{run_dir.root}: stage '{stage}' has not finished; run `selfreward {hint}` first")


def stage_sft(recipe: Recipe, run_dir: RunDir) -> dict:
    if (done := _skip(run_dir, "sft")) is not None:
        return done
    ift, eft, truncated = load_seeds(recipe.data, recipe.seed, recipe.limits)
    judge_template = load_template(recipe.judge.template, "judge.txt", ("instruction", "response"))
    result = run_sft(
        resolve_model(recipe.model.base), ift, eft, judge_template, recipe.sft, run_dir.sft_model,
        recipe.seed, recipe.model.trust_remote_code,
    )
    result["truncated"] = truncated
    run_dir.mark_done("sft", result)
    return result


def _require_model(recipe: Recipe, run_dir: RunDir, t: int) -> str:
    if t == 1 and recipe.sft.enabled:
        _require(run_dir, "sft", "sft")
    elif t > 1:
        _require(run_dir, f"iter{t - 1}/dpo", f"dpo --iteration {t - 1}")
    return run_dir.model_for(t, recipe)


def stage_prompts(recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict:
    if (done := _skip(run_dir, f"iter{t}/prompts")) is not None:
        return done
    model = recipe.prompts.model or _require_model(recipe, run_dir, t)
    ift, _, truncated = load_seeds(recipe.data, recipe.seed, recipe.limits)
    seeds = [r["instruction"] for r in ift]
    result = run_prompts(models.get(model), seeds, recipe.prompts, run_dir.prompts(t), t, recipe.seed)
    result["seed_instructions_truncated"] = truncated["ift_instructions"]
    run_dir.mark_done(f"iter{t}/prompts", result)
    return result


def stage_responses(recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict:
    if (done := _skip(run_dir, f"iter{t}/responses")) is not None:
        return done
    _require(run_dir, f"iter{t}/prompts", f"prompts --iteration {t}")
    prompts = read_jsonl(run_dir.prompts(t))
    backend = models.get(_require_model(recipe, run_dir, t))
    result = run_generate(backend, prompts, recipe.responses, run_dir.responses(t), recipe.seed, f"iter{t} responses")
    responses = read_jsonl(run_dir.responses(t))
    result["mean_tokens"] = round(mean(r["tokens"] for r in responses), 1) if responses else 0
    result["unfinished"] = sum(not r["finished"] for r in responses)
    run_dir.mark_done(f"iter{t}/responses", result)
    return result


def stage_judgments(recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict:
    if (done := _skip(run_dir, f"iter{t}/judgments")) is not None:
        return done
    _require(run_dir, f"iter{t}/responses", f"generate --iteration {t}")
    responses = read_jsonl(run_dir.responses(t))
    backend = models.get(_require_model(recipe, run_dir, t))
    result = run_judging(
        backend, responses, recipe.judge, recipe.limits, run_dir.judgments(t), recipe.seed, f"iter{t} judgments"
    )
    run_dir.mark_done(f"iter{t}/judgments", result)
    return result


def stage_judge_eval(recipe: Recipe, run_dir: RunDir, t: int, models: Models) -> dict | None:
    """How well M_t judges, against held-out human preferences (recipe `evaluation`); skipped if unset."""
    config = recipe.evaluation
    if not (config.ranked or config.pairs):
        return None
    if (done := _skip(run_dir, f"iter{t}/judge_eval")) is not None:
        return done
    backend = models.get(_require_model(recipe, run_dir, t))
    sampling = Sampling(recipe.judge.temperature, recipe.judge.top_p, recipe.judge.max_new_tokens, seed=recipe.seed)
    judge = Judge(backend, load_template(recipe.judge.template, "judge.txt", ("instruction", "response")),
                  config.mode, recipe.judge.samples, sampling)
    ranked = Path(config.ranked) if config.ranked else None
    pairs = Path(config.pairs) if config.pairs else None
    result = evaluate_judge(judge, ranked, pairs, config.limit,
                            max_chars=(recipe.limits.max_instruction_chars, recipe.limits.max_response_chars))
    write_json_atomic(run_dir.iteration(t) / "judge_eval.json", result)
    run_dir.mark_done(f"iter{t}/judge_eval", result)
    return result


def stage_pairs(recipe: Recipe, run_dir: RunDir, t: int) -> dict:
    if (done := _skip(run_dir, f"iter{t}/pairs")) is not None:
        return done
    _require(run_dir, f"iter{t}/judgments", f"judge --iteration {t}")
    result = run_pairs(read_jsonl(run_dir.responses(t)), read_jsonl(run_dir.judgments(t)), run_dir.pairs(t), recipe.seed)
    run_dir.mark_done(f"iter{t}/pairs", result)
    return result


def stage_dpo(recipe: Recipe, run_dir: RunDir, t: int) -> dict:
    if (done := _skip(run_dir, f"iter{t}/dpo")) is not None:
        return done
    _require(run_dir, f"iter{t}/pairs", f"pairs --iteration {t}")
    model = resolve_model(_require_model(recipe, run_dir, t))
    result = run_dpo(model, run_dir.pairs(t), recipe.dpo, run_dir.model(t), recipe.seed, recipe.model.trust_remote_code)
    run_dir.mark_done(f"iter{t}/dpo", result)
    return result


def iteration_metrics(run_dir: RunDir, t: int) -> dict[str, Any]:
    """The iteration's figures, gathered from its stages' completion records (missing stages: None)."""
    stages = {name: run_dir.done_record(f"iter{t}/{name}") or {} for name in ITERATION_STAGES}
    return {
        "iteration": t,
        "prompts": stages["prompts"].get("prompts"),
        "responses": stages["responses"].get("responses"),
        "mean_response_tokens": stages["responses"].get("mean_tokens"),
        "responses_cut": stages["responses"].get("unfinished"),
        "judgments": stages["judgments"].get("judge_samples"),
        "parse_failures": stages["judgments"].get("parse_failures"),
        "mean_score": stages["judgments"].get("mean_score"),
        "judged_text_truncated": stages["judgments"].get("truncated"),
        "pairs": stages["pairs"].get("pairs"),
        "ties_dropped": stages["pairs"].get("ties_dropped"),
        "unscored_dropped": stages["pairs"].get("unscored_dropped"),
        "dpo_loss": [stages["dpo"].get("first_loss"), stages["dpo"].get("last_loss")],
        "judge_pairwise_accuracy": _judge_accuracy(run_dir.done_record(f"iter{t}/judge_eval")),
        "seconds": {name: stages[name].get("seconds") for name in ITERATION_STAGES},
    }


def _judge_accuracy(record: dict | None) -> float | None:
    if not record:
        return None
    part = record.get("ranked") or record.get("pairs") or {}
    return (part.get("judge") or {}).get("pairwise_accuracy")


def write_metrics(run_dir: RunDir, t: int) -> None:
    write_json_atomic(run_dir.metrics(t), iteration_metrics(run_dir, t))

