"""Teaching a base model to end its turn: the chat template's end-of-turn token, started from the EOS token.

A chat template closes every assistant answer with a special token (Gemma's `<end_of_turn>`, Llama 3's
`<|eot_id|>`, ChatML's `<|im_end|>`) that a base model met seldom or never in pre-training. Gemma 3 270M
base gives it a log-probability of about -31 at the end of a complete answer, where it gives its
end-of-document token (`<eos>`) about -5; a few dozen LoRA steps of SFT lift the first only to about -22,
so the SFT model never stops and every answer runs to `max_new_tokens`.

`init_turn_end` measures both log-probabilities at the end of a few seed answers and, where the turn end
is more than `MARGIN` nats less likely than the document end, copies the document end's embedding rows
(input, and output where it is a separate matrix) to the turn end's: the model then ends a turn where it
would end a document, and SFT goes on from there (the demo's SFT then brings it to about -2). Chat models
and models whose template ends a turn with EOS itself are left as they are. Both figures and the decision
go into the SFT record.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# How much less likely (in nats) the turn end must be than the document end for the rows to be copied.
MARGIN = 10.0
# Seed answers measured.
SAMPLES = 4


def turn_end_token(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant answer; None when there is none or
    it is the EOS token."""
    if not getattr(tokenizer, "chat_template", None) or tokenizer.eos_token_id is None:
        return None
    answer = "The answer."
    text = tokenizer.apply_chat_template([{"role": "user", "content": "A question?"}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    if answer not in text:
        return None
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    for index in tokenizer(text[text.rindex(answer) + len(answer):], add_special_tokens=False)["input_ids"]:
        if index in special:
            return None if index == tokenizer.eos_token_id else index
    return None


def end_log_probs(model, tokenizer, examples: list[dict], token: int) -> tuple[float, float]:
    """The mean log-probability of `token` and of EOS at the end of the first `SAMPLES` IFT answers."""
    import torch

    turn, eos = [], []
    for record in examples[:SAMPLES]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]},
                                              {"role": "assistant", "content": record["response"]}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        end = max(i for i, index in enumerate(ids) if index == token)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:end]], device=model.device), logits_to_keep=1).logits[0, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        turn.append(float(log_probs[token]))
        eos.append(float(log_probs[tokenizer.eos_token_id]))
    return sum(turn) / len(turn), sum(eos) / len(eos)


def init_turn_end(model, tokenizer, examples: list[dict], measure=end_log_probs) -> dict[str, Any] | None:
    """Copy the EOS token's embedding rows to the turn end's where the model has not learnt to end a turn
    (see the module's docstring). Returns what was measured and done, or None when there is nothing to measure.
    `measure` is `end_log_probs` (tests pass a fake)."""
    import torch

    token = turn_end_token(tokenizer)
    if token is None or not examples:
        return None
    training = model.training
    model.eval()
    turn, eos = measure(model, tokenizer, examples, token)
    model.train(training)
    copied = turn < eos - MARGIN
    if copied:
        source = tokenizer.eos_token_id
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[token] = embeddings[source]
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != embeddings.data_ptr():
                head.weight[token] = head.weight[source]
                if getattr(head, "bias", None) is not None:
                    head.bias[token] = head.bias[source]
        log.info("SFT: the model ends documents (log p %.1f) but not turns (%.1f): %s starts from %s's embedding",
                 eos, turn, tokenizer.convert_ids_to_tokens(token), tokenizer.eos_token)
    return {"token": tokenizer.convert_ids_to_tokens(token), "log_prob": round(turn, 2), "eos_log_prob": round(eos, 2),
            "copied_from_eos": copied}
