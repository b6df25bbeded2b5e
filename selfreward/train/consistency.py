"""CREAM's consistency-weighted DPO loss (Wang et al. 2024, arXiv 2410.12735), on top of TRL's DPOTrainer.

Each pair carries C in [0, 1], how far M_t's and M_{t-1}'s rankings of its prompt's candidates agree
(`selfreward.stages.pairs.consistency`). Its sigmoid loss becomes

    C * -log sigma(beta * D) + (1 - C) * -log sigma(-beta * D)  =  -log sigma(beta * D) + (1 - C) * beta * D

with D = (log pi(chosen) - log pi_ref(chosen)) - (log pi(rejected) - log pi_ref(rejected)): a pair the two
judges rank alike (C = 1) trains as in plain DPO, one they rank oppositely (C = 0) as its swapped pair, and
C = 0.5 leaves it without pull. TRL computes the plain loss; `ConsistencyDPOTrainer` adds the second term,
reading D from the forward passes TRL makes (a hook on the policy and the reference model).
"""

from __future__ import annotations

from typing import Any

COLUMN = "consistency"


def make_trainer_class():
    """The DPOTrainer subclass (built on first use: TRL imports torch and transformers)."""
    from trl import DPOTrainer

    class ConsistencyDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator = _WithConsistency(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, COLUMN]

        def _compute_loss(self, model, inputs, return_outputs):
            weights = inputs.pop(COLUMN)
            passes: list[Any] = []  # model outputs in call order: the policy's first, then the reference's
            hooks = [module.register_forward_hook(lambda _module, _args, output: passes.append(output))
                     for module in {id(m): m for m in (self.accelerator.unwrap_model(model), self.ref_model) if m is not None}.values()]
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                for hook in hooks:
                    hook.remove()
            loss = result[0] if return_outputs else result
            seq_len = inputs["completion_mask"].size(1) - 1
            chosen, rejected = passes[0].log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
            if "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = passes[1].log_probs[:, -seq_len:].sum(dim=1).detach().chunk(2, dim=0)
            delta = (chosen - ref_chosen) - (rejected - ref_rejected)
            weight = dict(zip(self.loss_types, self.loss_weights))["sigmoid"]
            loss = loss + weight * ((1 - weights.to(delta.dtype)) * self.beta * delta).mean()
            return (loss, result[1]) if return_outputs else loss

    return ConsistencyDPOTrainer


class _WithConsistency:
    """TRL's preference collator, plus each pair's C as a tensor."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.collator(examples)
        batch[COLUMN] = torch.tensor([float(example[COLUMN]) for example in examples])
        return batch
