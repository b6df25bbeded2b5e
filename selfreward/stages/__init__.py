"""Every stage of the self-rewarding loop, declared once, in the order the loop runs them.

    M1 = SFT(M0, IFT + EFT seed data)
    for t = 1 .. T:
        prompts    = M_t writes new instructions (few-shot self-instruct)
        candidates = M_t answers each prompt N times                       (generate)
        judgments  = M_t judges each candidate k times                     (judge)
        [M_t as a judge, measured on held-out human preferences]           (evaluate, when the recipe asks)
        [an anchor model's candidates, judged by M_t]           (anchor-generate, anchor-judge: pairs.anchor)
        [M_{t-1} judges M_t's candidates too]          (consistency-judge: dpo.consistency_weighting)
        pairs      = best vs worst candidate per prompt, ties dropped       (pairs)
        [M_t judges its judgments: judge-training pairs]                 (meta-judge: meta_judge.enabled)
        M_{t+1}    = DPO(M_t, pairs), reference M_t                        (dpo)

A `Stage` says what the CLI, the loop, `merge`, the summary and the metrics need to know: its name (the
command and the done record), the run files it reads and writes, whether it uses a model for generation
or trains one, whether its work can be split into shards, and which of its done record's figures are
reported. Adding a stage is one module with a `stage(ctx)` function plus one entry in `STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from selfreward.recipe import Recipe
from selfreward.run.units import Shard
from selfreward.stages import dpo, evaluate, generate, head_to_head, judging, meta_judge, pairs, policy, prompts, sft
from selfreward.stages.context import StageContext
from selfreward.train.trainer import launch

MODEL = "model"  # in `reads`: M_t, the model the iteration starts from
NEXT_MODEL = "next_model"  # M_{t+1}, the model the iteration ends with (iter{t}/model)


@dataclass(frozen=True)
class Training:
    """The `run` of a stage that trains (SFT, DPO): its `train(ctx)` in this process, or in each of
    `launcher.num_processes` processes under `accelerate launch` (`selfreward.stages.worker` calls `train`
    there; the main process writes the model and the result that becomes the done record)."""

    train: Callable[[StageContext], dict[str, Any]]

    def __call__(self, ctx: StageContext) -> dict[str, Any]:
        if ctx.recipe.launcher.num_processes > 1:
            return launch(ctx.recipe.launcher, ctx.stage, ctx.run_dir.root, ctx.iteration)
        return self.train(ctx)


@dataclass(frozen=True)
class Metric:
    """One figure of an iteration: its key in iter{t}/metrics.json, its row label in the summary table,
    and how it is read from the stage's done record."""

    name: str
    label: str
    read: Callable[[dict[str, Any]], Any]
    # A figure only some recipes have (a switch's): its summary row is left out where no iteration has it.
    optional: bool = False


def field(name: str, label: str, key: str | None = None, optional: bool = False) -> Metric:
    return Metric(name, label, lambda record: record.get(key or name), optional)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: Callable[[StageContext], dict[str, Any]]
    # Run files read and written (RunDir method names), and the models: MODEL is M_t, NEXT_MODEL M_{t+1}.
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    # "generate": loads a model into a backend; "train": trains one; "forward": loads models itself for
    # forward passes only (backends are closed first for both).
    model: Literal["generate", "train", "forward"] | None = None
    # Shardable stages write one file; `summarize(ctx, records)` gives its counts (after a merge too).
    summarize: Callable[[StageContext, list[dict]], dict[str, Any]] | None = None
    per_iteration: bool = True
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    # Inputs the recipe can make unnecessary (the prompt stage needs no M_t with a fixed prompt model).
    skip_reads: Callable[[Recipe], tuple[str, ...]] = lambda recipe: ()
    metrics: tuple[Metric, ...] = ()

    @property
    def shardable(self) -> bool:
        return self.summarize is not None

    def done_key(self, iteration: int, shard: Shard | None = None) -> str:
        key = f"iter{iteration}/{self.name}" if self.per_iteration else self.name
        return f"{key}.{shard.suffix}" if shard else key

    def inputs(self, recipe: Recipe) -> tuple[str, ...]:
        return tuple(name for name in self.reads if name not in self.skip_reads(recipe))


SFT = Stage(
    "sft", "SFT: train M1 from the base model on IFT + EFT seed data (writes m1/).", Training(sft.train),
    writes=(MODEL,), model="train", per_iteration=False, enabled=lambda recipe: recipe.sft.enabled,
)
STAGES: tuple[Stage, ...] = (
    SFT,
    Stage(
        "prompts", "Self-instruct: M_t (or prompts.model) writes new prompts (iter{t}/prompts.jsonl).", prompts.stage,
        reads=(MODEL,), writes=("prompts",), model="generate",
        skip_reads=lambda recipe: (MODEL,) if recipe.prompts.model else (),
        metrics=(field("prompts", "prompts"),),
    ),
    Stage(
        "generate", "Sample N candidate responses per prompt with M_t (iter{t}/responses.jsonl).", generate.stage,
        reads=(MODEL, "prompts"), writes=("responses",), model="generate", summarize=generate.summarize,
        metrics=(field("responses", "responses"), field("mean_response_tokens", "mean response tokens", "mean_tokens"),
                 field("responses_cut", "responses cut at max tokens", "unfinished")),
    ),
    Stage(
        "judge", "M_t judges each candidate k times (iter{t}/judgments.jsonl).", judging.stage,
        reads=(MODEL, "responses"), writes=("judgments",), model="generate", summarize=judging.summarize,
        metrics=(field("judgments", "judgments", "judge_samples"), field("parse_failures", "parse failures"),
                 field("mean_score", "mean score"), field("judged_text_truncated", "judged text cut", "truncated")),
    ),
    Stage(
        "evaluate", "M_t as a judge against held-out human preferences (iter{t}/judge_eval.json; recipe 'evaluation').",
        evaluate.stage, reads=(MODEL,), writes=("judge_eval",), model="generate", enabled=evaluate.enabled,
        metrics=(Metric("judge_pairwise_accuracy", "judge pairwise acc. % (held out)", evaluate.pairwise_accuracy),),
    ),
    Stage(
        "anchor-generate", "pairs.anchor: the anchor model (M1 or M_{t-1}) answers the same prompts N times, from "
        "iteration 2 (iter{t}/anchor_responses.jsonl).", generate.anchor_stage,
        reads=(MODEL, "prompts"), writes=("anchor_responses",), model="generate", summarize=generate.summarize,
        enabled=lambda recipe: recipe.pairs.anchor is not None,
    ),
    Stage(
        "anchor-judge", "pairs.anchor: M_t judges the anchor's candidates k times (iter{t}/anchor_judgments.jsonl).",
        judging.anchor_stage, reads=(MODEL, "anchor_responses"), writes=("anchor_judgments",), model="generate",
        summarize=judging.anchor_summarize, enabled=lambda recipe: recipe.pairs.anchor is not None,
    ),
    Stage(
        "consistency-judge", "dpo.consistency_weighting: M_{t-1} judges M_t's candidates k times, from iteration 2 "
        "(iter{t}/previous_judgments.jsonl).", judging.previous_stage, reads=(MODEL, "responses"),
        writes=("previous_judgments",), model="generate", summarize=judging.summarize,
        enabled=lambda recipe: recipe.dpo.consistency_weighting,
    ),
    Stage(
        "pairs", "Best vs worst candidate per prompt, ties dropped (iter{t}/pairs.jsonl).", pairs.stage,
        reads=("responses", "judgments", "anchor_judgments", "previous_judgments"), writes=("pairs",),
        skip_reads=lambda recipe: (() if recipe.pairs.anchor else ("anchor_judgments",))
        + (() if recipe.dpo.consistency_weighting else ("previous_judgments",)),
        metrics=(field("pairs", "pairs"), field("ties_dropped", "ties dropped"),
                 field("unscored_dropped", "unscored dropped"),
                 field("mean_consistency", "mean consistency C (CREAM)", optional=True)),
    ),
    Stage(
        "meta-judge", "meta_judge: M_t compares its own judgments of each prompt's most disputed answer; best vs worst "
        "judgment by Elo become judge-training pairs (iter{t}/judge_pairs.jsonl).", meta_judge.stage,
        reads=(MODEL, "judgments", "pairs"), writes=("meta_judgments", "judge_pairs"), model="generate",
        enabled=lambda recipe: recipe.meta_judge.enabled,
        metrics=(field("judge_pairs", "judge pairs (meta-judge)", optional=True),),
    ),
    Stage(
        "dpo", "DPO-train M_{t+1} from M_t on the pairs (and the meta-judge's judge pairs), reference M_t (iter{t}/model/).",
        Training(dpo.train), reads=(MODEL, "pairs", "judge_pairs"), writes=(NEXT_MODEL,), model="train",
        skip_reads=lambda recipe: () if recipe.meta_judge.enabled else ("judge_pairs",),
        metrics=(Metric("dpo_loss", "DPO loss first → last", lambda r: [r.get("first_loss"), r.get("last_loss")]),),
    ),
    Stage(
        "policy", "M_{t+1}'s implicit reward against M_t as a judge of held-out human pairs (iter{t}/policy_eval.json; "
        "recipe 'evaluation.policy').", policy.stage, reads=(MODEL, NEXT_MODEL), writes=("policy_eval",), model="forward",
        enabled=policy.enabled,
        metrics=(field("policy_agreement", "policy agreement % (held out)", "accuracy"),
                 Metric("policy_agreement_ci", "  its 95 % CI, n", policy.interval)),
    ),
    Stage(
        "head-to-head", "M_{t+1} vs M_t on held-out instructions, judged in both orders by a fixed judge "
        "(iter{t}/head_to_head.json; recipe 'evaluation.head_to_head').", head_to_head.stage,
        reads=(MODEL, NEXT_MODEL), writes=("head_to_head",), model="generate", enabled=head_to_head.enabled,
        metrics=(field("head_to_head_win_rate", "M_{t+1} vs M_t win rate %", "win_rate"),
                 Metric("head_to_head_ci", "  its 95 % CI, n", head_to_head.interval),
                 field("head_to_head_lc_win_rate", "  length-controlled %", "lc_win_rate")),
    ),
)
BY_NAME = {stage.name: stage for stage in STAGES}
ITERATION = tuple(stage for stage in STAGES if stage.per_iteration)


def producer(name: str) -> Stage:
    """The iteration stage that writes the run file `name`."""
    return next(stage for stage in ITERATION if name in stage.writes)
