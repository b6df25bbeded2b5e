"""SFT of a base model: the chat template's end-of-turn token starts from EOS's embedding where the model has
not learnt to end a turn (selfreward/train/turn_end.py)."""

from __future__ import annotations

import json

from selfreward.models import load_causal_lm, load_tokenizer
from selfreward.train.turn_end import end_log_probs, init_turn_end, turn_end_token
from tests.conftest import ROOT

EXAMPLES = [json.loads(line) for line in (ROOT / "data" / "ift.jsonl").read_text().splitlines()[:4]]


def test_the_turn_end_is_the_templates_special_token_after_an_answer(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    assert turn_end_token(tokenizer) == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    # A template that ends the answer with EOS itself has nothing to teach.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert turn_end_token(tokenizer) is None
    tokenizer.chat_template = None
    assert turn_end_token(tokenizer) is None


def test_a_model_that_never_ends_a_turn_gets_eos_rows_and_then_ends_turns_as_it_ends_documents(tiny_model):
    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    token, eos = tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id
    embeddings = model.get_input_embeddings().weight
    assert not embeddings[token].equal(embeddings[eos])
    found = init_turn_end(model, tokenizer, EXAMPLES, measure=lambda *args: (-30.0, -3.0))
    assert found == {"token": "<end_of_turn>", "log_prob": -30.0, "eos_log_prob": -3.0, "copied_from_eos": True}
    assert embeddings[token].equal(embeddings[eos]) and model.get_output_embeddings().weight[token].equal(embeddings[eos])
    turn, end = end_log_probs(model, tokenizer, EXAMPLES, token)
    assert abs(turn - end) < 1e-5  # measured on the model itself now: the turn end is as likely as EOS


def test_a_model_that_ends_turns_is_left_as_it_is(tiny_model):
    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    before = model.get_input_embeddings().weight.clone()
    found = init_turn_end(model, tokenizer, EXAMPLES, measure=lambda *args: (-4.0, -3.0))
    assert found["copied_from_eos"] is False and model.get_input_embeddings().weight.equal(before)
    # The real measurement of the random tiny model: both tokens about equally (un)likely, nothing copied.
    measured = init_turn_end(model, tokenizer, EXAMPLES)
    assert measured["copied_from_eos"] is False and abs(measured["log_prob"] - measured["eos_log_prob"]) < 10
