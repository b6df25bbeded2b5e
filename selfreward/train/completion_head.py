"""The LM head only where labels count, for SFT and DPO on devices without Triton (CPUs).

TRL's trainers give the model a fused LM head (`trl.trainer.utils.add_fused_lm_head`): per-token
log-probabilities computed in tiles without the full (batch, length, vocab) logits. On CUDA it projects only
the positions whose label is not -100; elsewhere it projects every position, prompts and padding
included, and accumulates its gradients in float32. With a 262k vocabulary the head is ~60 % of a small
model's compute per token, and an EFT example's prompt (the judge rubric) is ~85 % of its tokens.

`install(trainer)` replaces that head, on the trainer's model and reference model, by one that gathers the
label positions first and projects them in chunks under activation checkpointing (each chunk's logits are
recomputed in the backward pass instead of stored), in the autocast dtype. It returns the same fields
(`trl.trainer.utils.FusedCausalLMOutput`), so the trainers' losses and metrics are unchanged.
"""

from __future__ import annotations

import functools
import logging
import types

log = logging.getLogger(__name__)

# Elements of one chunk's logits (tokens x vocabulary): 2**26 float32 values = 256 MiB.
CHUNK_ELEMENTS = 2**26
# Config attributes that change the logits in ways this head does not reproduce: keep TRL's head there.
UNSUPPORTED = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling", "output_router_logits")


def label_log_probs(hidden, weight, bias, labels, softcap: float | None = None, chunk_elements: int = CHUNK_ELEMENTS):
    """(log p(label), entropy, label is top-1, mean logit) for each row of `hidden` (tokens, hidden size).

    Only the log-probabilities carry gradients; the logits of one chunk of tokens exist at a time.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    size = max(1, chunk_elements // weight.shape[0])
    parts = [
        checkpoint(_chunk, hidden[start : start + size], weight, bias, labels[start : start + size], softcap, use_reentrant=False)
        for start in range(0, hidden.shape[0], size)
    ]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty + hidden.sum() * 0, empty, empty.bool(), empty
    return tuple(torch.cat(column) for column in zip(*parts))


def _chunk(hidden, weight, bias, labels, softcap):
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_z = logits.logsumexp(dim=-1)
    log_probs = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z
    with torch.no_grad():  # metrics only
        probs = torch.exp(logits - log_z.unsqueeze(-1))
        entropy = log_z - (probs * logits).sum(dim=-1)
        top1 = logits.argmax(dim=-1) == labels
        mean = logits.mean(dim=-1)
    return log_probs, entropy, top1, mean


def supported(model) -> bool:
    config = model.config.get_text_config()
    return not any(getattr(config, name, None) for name in UNSUPPORTED)


def add_completion_head(model, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Give `model` (already patched by TRL) a `fused_lm_head=True` forward that projects label positions only."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        labels = labels.to(lm_head.weight.device)
        mask = labels != -100
        values = label_log_probs(hidden.to(lm_head.weight.device)[mask], lm_head.weight, lm_head.bias, labels[mask], softcap, chunk_elements)
        log_probs, entropy, top1, mean = (
            v.new_zeros(mask.shape).masked_scatter(mask, v) for v in values
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=top1, mean_logits=mean,
            log_sum_sq_probs=None, label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


def install(trainer) -> bool:
    """On a device where TRL's head scores every position, give the trainer's model (and reference model)
    the label-positions-only head. Returns whether it did."""
    import trl.trainer.utils
    from peft import PeftModel

    if trainer.accelerator.device.type in ("cuda", "xpu"):
        return False  # TRL's Triton head already projects label positions only
    if not hasattr(trl.trainer.utils, "FusedCausalLMOutput"):
        return False  # a TRL without a fused head computes the logits itself
    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    models = [model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
    if not all(supported(m) for m in models):
        log.info("keeping TRL's LM head: this model scales or routes its logits")
        return False
    for m in models:
        add_completion_head(m)
    return True
