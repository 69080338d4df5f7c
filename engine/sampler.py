"""The sampler: penalties, temperature, top-k / top-p / min-p and a seeded draw, on the device, no host sync.
Each slot has a row of parameters (param_row) in a device table and one uniform per token from its choice's
own RNG, so a choice's tokens do not depend on the batch it runs in or the device path taken."""

import torch

from engine.sampling_params import MAX_LOGPROBS
from tokenizer import N_VOCAB

TOPK_CANDIDATES = 256  # batches whose top_k are all within this sample from torch.topk, not a full sort

# Columns of the per-slot parameter table (S, len(COLS)), float32.
COLS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "greedy")
TEMP, TOPK, TOPP, MINP, REP, PRES, FREQ, GREEDY = range(len(COLS))


def param_row(p):
    """A choice's row of the parameter table; filters that are off get values that change nothing."""
    off = {"temperature": 1.0 if p.greedy else p.temperature, "top_k": p.top_k if 1 <= p.top_k < N_VOCAB else N_VOCAB,
           "top_p": p.top_p if p.top_p < 1.0 else 2.0, "greedy": float(p.greedy)}
    return [off[name] if name in off else getattr(p, name) for name in COLS]


def sampler_kind(params_list, logprobs=False):
    """How a batch samples: (n_cand, penalize, logprobs, masked), part of a CUDA graph's key. n_cand (see
    sample): 0 if every row is greedy; -1 if no sampled row has top-k / top-p; TOPK_CANDIDATES if every
    sampled row's top_k is within it; else N_VOCAB (full sort). penalize: some row has a penalty or a
    logit bias. masked: some row has a grammar: the batch samples under a token bitmask."""
    penalize = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logit_bias
                   for p in params_list)
    sampled = [p for p in params_list if not p.greedy]
    if not sampled:
        n_cand = 0
    elif all(p.top_k in (0, N_VOCAB) and p.top_p >= 1.0 for p in sampled):
        n_cand = -1
    elif all(1 <= p.top_k <= TOPK_CANDIDATES for p in sampled):
        n_cand = TOPK_CANDIDATES
    else:
        n_cand = N_VOCAB
    return n_cand, penalize, bool(logprobs), any(p.constraint is not None for p in params_list)


def sample(logits, p, u, n_cand, penalties=None):
    """Pick the next id of every row, without a host sync. logits (B, V') with V' >= N_VOCAB; p (B, len(COLS))
    parameter rows; u (B, 1) uniforms in [0, 1); penalties: None or (bias, seen, counts), each (B, N_VOCAB):
    logit bias, tokens in the prompt or output (repetition penalty, CTRL-style), how often each token was
    generated (presence / frequency penalties). n_cand (a Python int: fixed shapes for CUDA graphs): 0 =
    argmax only; -1 = no top-k / top-p (no sort); k < N_VOCAB = the cut-off from torch.topk(k); N_VOCAB =
    a full sort. Inverse-CDF over the kept tokens in vocabulary order, so the id a given u picks never
    depends on the path."""
    logits = logits[:, :N_VOCAB].to(torch.promote_types(logits.dtype, torch.float32))  # (B, V); float64 stays
    if penalties is not None:
        bias, seen, counts = penalties
        logits = logits + bias
        rep = p[:, REP:REP + 1]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - p[:, PRES:PRES + 1] * (counts > 0) - p[:, FREQ:FREQ + 1] * counts
    best = logits.argmax(dim=-1)  # (B,)
    if n_cand == 0:
        return best
    # log-probabilities relative to the best token, <= 0: a tiny temperature gives -inf, never NaN
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / p[:, TEMP:TEMP + 1]  # (B, V)
    scaled = scaled.masked_fill(scaled < torch.log(p[:, MINP:MINP + 1]), float("-inf"))  # min-p; log 0 = -inf
    if n_cand > 0:
        if n_cand < scaled.size(-1):
            vals = torch.topk(scaled, n_cand, dim=-1).values  # (B, n) descending
        else:
            vals = torch.sort(scaled, dim=-1, descending=True).values
        rank = torch.arange(n_cand, device=logits.device)  # (n,)
        probs = torch.softmax(vals.masked_fill(rank >= p[:, TOPK:TOPK + 1], float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability ranked above each candidate
        keep = ((before < p[:, TOPP:TOPP + 1]) | (rank == 0)) & (rank < p[:, TOPK:TOPK + 1])  # the best always stays
        threshold = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    cum = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # (B, V)
    total = cum[:, -1:]  # (B, 1), about 1
    last = (cum < total).sum(dim=-1, keepdim=True)  # (B, 1) the last id with probability
    choice = torch.minimum(torch.searchsorted(cum, u * total, right=True), last)  # (B, 1)
    return torch.where(p[:, GREEDY] > 0, best, choice.squeeze(1))


def logprobs(logits, ids):
    """Raw log-probabilities (before any sampling parameter) of ids (R,) under logits (R, V') ->
    (logprob (R,), top ids (R, MAX_LOGPROBS), their logprobs)."""
    raw = torch.log_softmax(logits[:, :N_VOCAB].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top = raw.topk(MAX_LOGPROBS, dim=-1)
    return raw.gather(1, ids.view(-1, 1)).view(-1), top.indices, top.values


def entry(token, logprob, top_ids, top_lps, k):
    """One token's logprobs as the API returns them: its own and the k best alternatives."""
    return {"token_id": token, "logprob": logprob, "top": list(zip(top_ids[:k or 0], top_lps[:k or 0]))}
