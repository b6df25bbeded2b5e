"""Top-p sampling without sorting the vocabulary, each row from its own random stream.

Each row draws its random numbers from its own generator, seeded from the caller's seed and the row's place
in the call, and the n-th token of a row uses the row's n-th number, so what a row samples does not depend
on which other rows share its batch. The nucleus is found among the top-K tokens (K grows, row by row, until
the nucleus fits), so the kept set is exactly what transformers' top-p warper keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Candidates examined first when looking for the top-p nucleus; grown 8x while the nucleus does not fit.
FIRST_K = 64


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniform numbers in [0, 1); row r depends only on seeds[r]."""
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed % (2**63))
        rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


def top_candidates(values: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(values, k)` over the last dimension, faster for a wide vocabulary on a CPU.

    The k largest values lie in the k blocks with the largest maxima (a block holding one of them has a
    maximum at least as large as the k-th value, and at most k blocks do), so a pass of block maxima and a
    top-k among k blocks replace a top-k over the whole vocabulary.
    """
    rows, width = values.shape
    if width % block or width // block <= k:
        return torch.topk(values, k, dim=-1)
    blocks = values.view(rows, width // block, block)
    chosen = torch.topk(blocks.amax(dim=-1), k, dim=-1).indices
    gathered = blocks.gather(1, chosen.unsqueeze(-1).expand(-1, -1, block)).view(rows, k * block)
    top, where = torch.topk(gathered, k, dim=-1)
    return top, chosen.gather(-1, where // block) * block + where % block


def log_normaliser(logits: torch.Tensor, temperature: float, row_max: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(rows, 1) log of the softmax denominator of `logits / temperature`, in float32.

    Computed over column chunks in one reused float32 buffer (the subtraction of the row maximum is also the
    cast): the temporaries stay in cache instead of several full (rows, vocab) float32 tensors, whose memory
    traffic is most of a decoding step's sampling cost with a 262k vocabulary. On a GPU, one `logsumexp`
    (memory traffic is cheap there; launches are not).
    """
    if logits.device.type != "cpu":  # a GPU reads memory fast enough; one kernel beats 4 launches per chunk
        return torch.logsumexp(logits.float() / temperature, dim=-1, keepdim=True)
    total = torch.zeros(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
    buffer = torch.empty(logits.shape[0], min(chunk, logits.shape[-1]), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[-1], chunk):
        part = logits[:, start : start + chunk]
        shifted = buffer[:, : part.shape[-1]]
        torch.sub(part, row_max, out=shifted)
        total += shifted.mul_(1.0 / temperature).exp_().sum(dim=-1, keepdim=True)
    return row_max / temperature + total.log()


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over (rows, vocab) logits at `temperature`: (token ids, kept probabilities) per row, best first,
    padded with zero probability. A token is kept when the mass of the tokens ranked above it is below
    `top_p` (the rule of transformers' top-p warper), so at least one token is always kept. Only the
    candidates are sorted; the whole vocabulary is read twice (block maxima, normaliser).

    The candidate set grows row by row: most rows' nuclei hold a few tokens, and a row whose nucleus holds
    thousands (a flat distribution) must not make every other row of the batch sort thousands too.
    """
    rows, vocab = logits.shape
    top, ids = top_candidates(logits, min(FIRST_K, vocab))
    log_z = log_normaliser(logits, temperature, top[:, :1].float())
    values = torch.exp(top.float() / temperature - log_z)
    where = torch.arange(rows, device=logits.device)
    while ids.shape[-1] < vocab:
        where = where[values[where].sum(dim=-1) < top_p]  # rows whose nucleus is not inside their candidates
        if not len(where):
            break
        top, wider = top_candidates(logits[where], min(vocab, ids.shape[-1] * 8))
        pad = wider.shape[-1] - ids.shape[-1]  # every row widens to the new width; only `where` gets new candidates
        ids = torch.nn.functional.pad(ids, (0, pad)).index_copy(0, where, wider)
        wider_values = torch.exp(top.float() / temperature - log_z[where])
        values = torch.nn.functional.pad(values, (0, pad)).index_copy(0, where, wider_values)
    before = values.cumsum(dim=-1) - values
    return ids, values.masked_fill(before >= top_p, 0.0)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (rows, vocab) logits: greedy at temperature 0, else top-p sampling by inverse
    transform of the row's uniform number."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if top_p < 1.0:
        ids, kept = nucleus(logits, temperature, top_p)
    else:
        kept, ids = torch.softmax(logits.float() / temperature, dim=-1), None
    cumulative = kept.double().cumsum(dim=-1)
    # The uniform numbers are drawn on the CPU (the same stream on every device) and move to the logits' device.
    target = (uniforms.to(cumulative.device, cumulative.dtype) * cumulative[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cumulative, target, right=True).clamp(max=kept.shape[-1] - 1)
    if ids is None:
        return choice.squeeze(-1)
    # Never land on the zero-probability tail of a nucleus (possible only through rounding).
    choice = torch.minimum(choice, (kept > 0).sum(dim=-1, keepdim=True) - 1)
    return ids.gather(-1, choice).squeeze(-1)
