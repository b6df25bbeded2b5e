"""Training survives preemption: killed mid-epoch, rerun, it ends with the weights and step count of an
uninterrupted run; the checkpoint schedule is on by default and cleaned up once the model is saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfreward.data.seeds import load_eft, load_ift
from selfreward.judge import load_judge_template
from selfreward.recipe import DpoSection, SftSection
from selfreward.run.jsonl import read_jsonl
from selfreward.stages.dpo import run_dpo
from selfreward.stages.sft import run_sft


class Preempted(Exception):
    pass


def preempt_after_checkpoint(step: int):
    """A trainer callback that dies right after the checkpoint of `step` is on disk (as a kill would)."""
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Preempted()

    return Preempt()


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


TRAIN = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation_steps": 1, "precision": "fp32",
         "save_steps": 1, "save_minutes": None}


def sft(tiny_model, output, callbacks=()):
    config = SftSection(**TRAIN, max_length=256, group_by_length=False)
    ift, eft = load_ift("data/ift.jsonl")[:8], load_eft("data/eft.jsonl")[:4]
    return run_sft(tiny_model, ift, eft, load_judge_template(), config, output, 0, callbacks=list(callbacks),
                   log_path=output.parent / "train_log.jsonl")


def dpo(tiny_model, output, callbacks=()):
    pairs = output.parent / "pairs.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"A careful answer to question {i}."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }) + "\n" for i in range(8)))
    config = DpoSection(**TRAIN, max_length=128, lora={"enabled": True, "r": 4, "alpha": 8})
    return run_dpo(tiny_model, pairs, config, output, 0, callbacks=list(callbacks), log_path=output.parent / "train_log.jsonl")


@pytest.mark.parametrize(("train", "steps"), [(sft, 4), (dpo, 4)])  # 8 IFT examples (EFT ones exceed max_length), 8 pairs; batches of 2
def test_training_killed_mid_epoch_resumes_to_the_weights_and_steps_of_an_uninterrupted_run(tiny_model, tmp_path, train, steps):
    whole = train(tiny_model, tmp_path / "whole" / "model")
    assert whole["steps"] == steps
    work = tmp_path / "killed" / ".model.work"
    with pytest.raises(Preempted):
        train(tiny_model, tmp_path / "killed" / "model", [preempt_after_checkpoint(3)])
    assert [p.name for p in work.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-3"]  # the last one only
    resumed = train(tiny_model, tmp_path / "killed" / "model")
    assert resumed["steps"] == whole["steps"]
    assert not work.exists()  # the trainer checkpoint is gone once the model is saved
    expected, actual = weights(tmp_path / "whole" / "model"), weights(tmp_path / "killed" / "model")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    base = weights(Path(tiny_model))
    assert any(not torch.equal(actual[name], base[name]) for name in base)  # training moved the weights
    assert not any("lora" in name for name in actual)  # adapters merged: a plain checkpoint
    # The per-step log: one record a step, the records written before the kill past step 3 dropped on resume.
    logged = read_jsonl(tmp_path / "killed" / "train_log.jsonl")
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert logged == read_jsonl(tmp_path / "whole" / "train_log.jsonl")
    assert [r["loss"] for r in logged] == [r["loss"] for r in resumed["log"]]


def test_training_prints_no_raw_step_records(tiny_model, tmp_path, capfd):
    result = sft(tiny_model, tmp_path / "m1")
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "'learning_rate'" not in out + err
    assert len(read_jsonl(tmp_path / "train_log.jsonl")) == result["steps"] > 0


def test_the_allocator_keeps_freed_memory_unless_told_not_to(monkeypatch):
    from selfreward.allocator import keep_freed_memory

    assert keep_freed_memory() is True  # Linux with glibc, as CI runs
    monkeypatch.setenv("SELFREWARD_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_packed_sft_trains_the_weights_of_padded_sft_on_the_same_examples(tiny_model, tmp_path):
    """Packing only removes padding: with all examples in one step (one packed row, or one padded batch)
    the loss and the trained weights are those of the padded run."""
    ift = load_ift("data/ift.jsonl")[:6]
    template = load_judge_template()

    def train(name: str, **settings):
        config = SftSection(**{**TRAIN, "save_steps": None, "max_length": 2048, "group_by_length": False, **settings})
        return run_sft(tiny_model, ift, [], template, config, tmp_path / name, 0)

    padded = train("padded", batch_size=len(ift), packing=False)
    packed = train("packed", batch_size=1, packing=True)
    assert padded["steps"] == packed["steps"] == 1  # one step each: the same six examples
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-4)
    expected, actual, base = weights(tmp_path / "padded"), weights(tmp_path / "packed"), weights(Path(tiny_model))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(actual[name], base[name]) for name in base)  # the step moved the weights


def test_trainer_records_go_to_the_integrations_a_recipe_names_and_nowhere_else_by_default(tmp_path):
    from selfreward.train.trainer import trainer_args

    assert trainer_args(SftSection(), tmp_path, 0)["report_to"] == "none"
    assert trainer_args(SftSection(report_to=["tensorboard", "wandb"]), tmp_path, 0)["report_to"] == ["tensorboard", "wandb"]


def answer_log_probs(model_dir, examples: list[tuple[str, str]]) -> list[float]:
    """log pi(answer | instruction) under the chat template, per (instruction, answer)."""
    from selfreward.judge.policy import completion_logprobs
    from selfreward.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    return [completion_logprobs(model, tokenizer, instruction, [answer], 256)[0] for instruction, answer in examples]


def test_sft_raises_the_likelihood_of_its_answers(tiny_model, tmp_path):
    result = sft(tiny_model, tmp_path / "m1")
    examples = [(r["instruction"], r["response"]) for r in load_ift("data/ift.jsonl")[:8]]
    before, after = answer_log_probs(tiny_model, examples), answer_log_probs(tmp_path / "m1", examples)
    assert result["last_loss"] < result["first_loss"]
    assert sum(after) > sum(before) and sum(a > b for a, b in zip(after, before)) >= 7


def dpo_margins(tiny_model, tmp_path, swap: bool) -> list[float]:
    """Per pair, [log pi(chosen) - log pi(rejected)] after DPO minus the same under the reference (M_t), for
    the pairs as judged; DPO trains on them as judged or, with `swap`, with chosen and rejected swapped."""
    pairs = [(f"Question {i}?", f"A careful answer to question {i}.", "No.") for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": r if swap else c}],
                                        "rejected": [{"role": "assistant", "content": c if swap else r}]}) + "\n" for q, c, r in pairs))
    config = DpoSection(**TRAIN, max_length=128, lora={"enabled": True, "r": 4, "alpha": 8})
    run_dpo(tiny_model, path, config, tmp_path / "model", 0)
    chosen = [(q, c) for q, c, _ in pairs]
    rejected = [(q, r) for q, _, r in pairs]
    policy = [c - r for c, r in zip(answer_log_probs(tmp_path / "model", chosen), answer_log_probs(tmp_path / "model", rejected))]
    reference = [c - r for c, r in zip(answer_log_probs(tiny_model, chosen), answer_log_probs(tiny_model, rejected))]
    return [p - r for p, r in zip(policy, reference)]


@pytest.mark.parametrize("swap", [False, True], ids=["as_judged", "chosen_and_rejected_swapped"])
def test_dpo_moves_the_policy_toward_its_chosen_answers(tiny_model, tmp_path, swap):
    margins = dpo_margins(tiny_model, tmp_path, swap)
    # DPO's implicit reward margin on its own training pairs rises from 0; with the labels swapped it falls.
    if swap:
        assert sum(margins) < 0 and all(m < 0 for m in margins)
    else:
        assert sum(margins) > 0 and all(m > 0 for m in margins)


def test_dpo_plus_nll_adds_the_weighted_nll_of_the_chosen_answers(tiny_model, tmp_path):
    """loss_type [sigmoid, sft]: at the first step (policy = reference) the loss is ln 2 + w * the mean NLL per
    token of the chosen answers, exactly as the formula says."""
    import math

    from selfreward.models import load_tokenizer

    pairs = [(f"Question {i}?", f"A careful answer to question {i}.", "No.") for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for q, c, r in pairs))
    weight = 0.5
    config = DpoSection(**{**TRAIN, "batch_size": 8}, max_length=128, loss_type=["sigmoid", "sft"], loss_weights=[1.0, weight])
    result = run_dpo(tiny_model, path, config, tmp_path / "model", 0, log_path=tmp_path / "log.jsonl")
    tokenizer = load_tokenizer(tiny_model)
    sums = answer_log_probs(tiny_model, [(q, c) for q, c, _ in pairs])
    counts = []
    for q, c, _ in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": c}], tokenize=False)
        counts.append(len(tokenizer(full, add_special_tokens=False)["input_ids"]) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    nll = -sum(sums) / sum(counts)
    assert result["first_loss"] == pytest.approx(math.log(2) + weight * nll, abs=2e-3)
    plain = run_dpo(tiny_model, path, DpoSection(**{**TRAIN, "batch_size": 8}, max_length=128), tmp_path / "plain", 0)
    assert plain["first_loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_dpo_loss_weights_must_fit_the_loss_types():
    from selfreward.errors import UserError
    from selfreward.recipe import parse_recipe

    with pytest.raises(UserError, match=r"dpo.loss_weights: one weight per loss type \(2: sigmoid, sft\), got 1"):
        parse_recipe({"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "r")
    with pytest.raises(UserError, match=r"dpo\.ld_alpha"):
        parse_recipe({"dpo": {"ld_alpha": 1.5}}, "r")


def consistency_dpo(tiny_model, folder: Path, c: float | None, swap: bool = False, lora: bool = True) -> dict[str, torch.Tensor]:
    """The weights after DPO on 8 pairs, each with consistency `c` (None: plain DPO), as judged or swapped."""
    folder.mkdir(parents=True)
    records = []
    for i in range(8):
        good, bad = f"A careful answer to question {i}.", "No."
        chosen, rejected = (bad, good) if swap else (good, bad)
        records.append({"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], **({"consistency": c} if c is not None else {})})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = DpoSection(**{**TRAIN, "save_steps": None}, max_length=128, consistency_weighting=c is not None,
                        lora={"enabled": lora, "r": 4, "alpha": 8})
    result = run_dpo(tiny_model, folder / "pairs.jsonl", config, folder / "model", 0)
    assert result.get("consistency_weighted", False) == (c is not None)
    return weights(folder / "model")


@pytest.mark.parametrize("lora", [True, False], ids=["lora_reference_by_adapter", "frozen_reference_copy"])
def test_consistency_weighting_trains_as_its_formula_says(tiny_model, tmp_path, lora):
    """C * loss(chosen, rejected) + (1 - C) * loss(rejected, chosen): with C = 1 the weights of plain DPO, with
    C = 0 those of plain DPO on the swapped pairs, with C = 0.5 no pull at all (the start's weights)."""
    plain = consistency_dpo(tiny_model, tmp_path / "plain", None, lora=lora)
    swapped = consistency_dpo(tiny_model, tmp_path / "swapped", None, swap=True, lora=lora)
    agree = consistency_dpo(tiny_model, tmp_path / "c1", 1.0, lora=lora)
    disagree = consistency_dpo(tiny_model, tmp_path / "c0", 0.0, lora=lora)
    undecided = consistency_dpo(tiny_model, tmp_path / "c05", 0.5, lora=lora)
    start = weights(Path(tiny_model))
    moved = [name for name in plain if not torch.equal(plain[name], start[name])]
    assert moved
    for name in moved:
        torch.testing.assert_close(agree[name], plain[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(disagree[name], swapped[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(undecided[name], start[name], rtol=0, atol=1e-5)
    assert any(not torch.allclose(plain[name], swapped[name], atol=1e-3) for name in moved)  # far beyond the tolerance


def test_consistency_weighting_is_refused_where_its_loss_is_not_defined():
    from selfreward.errors import UserError
    from selfreward.recipe import parse_recipe

    with pytest.raises(UserError, match=r"dpo.*consistency_weighting weights the sigmoid loss"):
        parse_recipe({"dpo": {"consistency_weighting": True, "loss_type": ["ipo"]}}, "r")
    with pytest.raises(UserError, match=r"dpo.*consistency_weighting: not with dpo.ld_alpha"):
        parse_recipe({"dpo": {"consistency_weighting": True, "ld_alpha": 0.5}}, "r")
    with pytest.raises(UserError, match=r"pairs\.anchor"):
        parse_recipe({"pairs": {"anchor": "m2"}}, "r")
