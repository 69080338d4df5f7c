"""Text generation for our GPT: loading, sampling, stop strings, streaming, batching, fast decoding.

Python API (DESIGN.md "Python API of inference.py"):

    model, info = load_model_from_checkpoint(path, device=None, dtype=None, quantize=None)
    result = generate_text(model, prompt, max_new_tokens=128, temperature=0.8, top_k=50, top_p=1.0,
                           repetition_penalty=1.0, stop=None, seed=None, raw=False)
    for piece in stream_text(model, prompt, **same): ...
    results = generate_batch(model, [prompt, ...], **same)        # a value or a list per row
    for event in stream_batch(model, [prompt, ...], **same): ...  # {"index", "text"} / {"index", "done", ...}
    validate_params(**params), check_fits(...), count_tokens(prompt, raw), PARAM_RANGES   # for the server
CLI: python inference.py --ckpt PATH --prompt TEXT [--stream] [--raw] [sampling flags]  (--help)

How a generation runs (one code path for every device):
1. Prompts are encoded (instruction template unless raw), left-padded to one width W and
   prefilled in one forward pass into a KV-cache (`model.KVCache`, `pad` = padding per row).
2. Every step feeds the last token of each row, then `sample_tokens` picks the next one on the
   device (repetition penalty, temperature, top-k, top-p, inverse-CDF with one uniform per row
   drawn on the host from the row's private `random.Random(seed)`, so results do not depend on
   the device, the batch or the global RNG).
3. The host reads the sampled ids every `chunk` steps (one sync per chunk, not per token; on
   CUDA the next chunk is already queued then), turns them into text (incremental UTF-8
   decoding, stop strings held back until they cannot match) and finishes rows at
   <|endoftext|>, a stop string, max_new_tokens or cancellation. Finished rows are dropped from
   the batch when at most half of it is still running.

Decode modes (Engine.mode):
- "eager": KVCache eager mode, attention over the filled part only. CPU / MPS default.
- "static": KVCache static mode (input_pos tensor, fixed shapes) over a bucketed cache length
  (multiples of `bucket` = 128 slots), no CUDA graphs. Runs on CPU too: the tests drive the
  graph path's logic through it.
- "graphs": "static" with each decode step (forward + sampling + bookkeeping) captured in a CUDA
  graph per (batch bucket, cache bucket, sampler kind), optionally torch.compile'd first. CUDA default.
Static caches live in persistent per-batch-size slots: per layer, contiguous (B, H, L, D) tensors
over two flat buffers (even / odd buckets; crossing a bucket copies the filled slots across).
Their memory: 2 buffers x (k, v) x n_layer x B x n_embd x block_size x dtype bytes per slot
(GPT-2 124M bf16: 75 MB per row of B; slots B = 1, 2, 4, ... up to max_batch).

Shapes: B batch rows, W prompt width (after left padding), L cache slots, V vocab (logits may be
padded past N_VOCAB; ids >= N_VOCAB are never sampled), K steps per chunk.
"""

import argparse
import codecs
import copy
import inspect
import math
import os
import random
import secrets
import sys
import threading
import time
import types
import warnings
import weakref

import torch
from torch import nn

from common import UserError, pick_device, pick_dtype, run_cli
from prompt import format_prompt
from tokenizer import EOT_ID, N_VOCAB, encode, get_tokenizer

FINISH_REASONS = ("eos", "stop", "length", "cancelled")
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
TOPK_CANDIDATES = 256  # rows with 1 <= top_k <= this sample from torch.topk, not a full sort
SEED_MAX = 2**63 - 1

# Allowed values of every generation parameter: validate_params enforces them, the server and the
# chat page read them (422 messages, form limits). "max": None means "limited by the model":
# prompt tokens + max_new_tokens <= block_size.
PARAM_RANGES = {
    "max_new_tokens": {"type": "int", "min": 1, "max": None, "default": 128,
                       "help": "most tokens to generate; prompt tokens + max_new_tokens <= the model's block_size"},
    "temperature": {"type": "float", "min": 0.0, "max": 2.0, "default": 0.8,
                    "help": "0 = greedy (always the most likely token)"},
    "top_k": {"type": "int", "min": 0, "max": N_VOCAB, "default": 50,
              "help": "sample from the k most likely tokens; 0 = no limit"},
    "top_p": {"type": "float", "min": 0.0, "max": 1.0, "min_exclusive": True, "default": 1.0,
              "help": "nucleus sampling: the smallest set of tokens with this much probability; 1 = off"},
    "repetition_penalty": {"type": "float", "min": 1.0, "max": 2.0, "default": 1.0,
                           "help": "CTRL-style penalty on tokens already in the prompt or output; 1 = off"},
    "stop": {"type": "stop", "max_items": MAX_STOP_STRINGS, "max_chars": MAX_STOP_CHARS, "default": None,
             "help": "a string or a list of strings; generation ends before the first one (not included)"},
    "seed": {"type": "int", "min": 0, "max": SEED_MAX, "default": None,
             "help": "same seed and inputs give the same text; null = random"},
    "raw": {"type": "bool", "default": False,
            "help": "send the prompt as is (base models) instead of the instruction template"},
    "ignore_eos": {"type": "bool", "default": False,
                   "help": "keep generating after <|endoftext|> (benchmarks)"},
}
DEFAULTS = {name: spec["default"] for name, spec in PARAM_RANGES.items()}


class ParamError(ValueError):
    """An invalid generation parameter; `param` names it (the server's 422 `param` field)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


# ====================================================================== parameters


def _fmt(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_number(name, value, spec):
    """An int or float parameter within its range; returns it as int or float."""
    lo, hi = spec["min"], spec["max"]
    is_int = spec["type"] == "int"
    if is_int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():  # JSON may send 64.0
            value, ok = int(value), True
        kind = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a number"
    if ok:
        low_ok = value > lo if spec.get("min_exclusive") else value >= lo
        ok = low_ok and (hi is None or value <= hi)
    if not ok:
        if hi is None:
            rng = f">= {lo}"
        else:
            rng = f"in ({lo}, {hi}]" if spec.get("min_exclusive") else f"between {lo} and {hi}"
        raise ParamError(name, f"{name} must be {kind} {rng} ({spec['help']}), got {_fmt(value)}")
    return int(value) if is_int else float(value)


def _check_stop(value):
    """None, a string or a list of strings -> a tuple of non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    ok = isinstance(items, (list, tuple)) and len(items) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
    if not ok:
        raise ParamError("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty "
                                 f"strings of at most {MAX_STOP_CHARS} characters each, got {_fmt(value)}")
    return tuple(dict.fromkeys(items))  # unique, order kept


def validate_params(**params):
    """Check generation parameters; returns a full dict (defaults filled in, values normalized).

    Raises ParamError (a ValueError) naming the first bad parameter and its allowed range, also for
    unknown names. Does not know the prompt: see check_fits for the block_size limit.
    """
    out = dict(DEFAULTS)
    for name, value in params.items():
        spec = PARAM_RANGES.get(name)
        if spec is None:
            raise ParamError(name, f"unknown generation parameter {name!r}; known: {', '.join(PARAM_RANGES)}")
        if value is None and spec["default"] is None:
            out[name] = None
        elif spec["type"] in ("int", "float"):
            out[name] = _check_number(name, value, spec)
        elif spec["type"] == "bool":
            if not isinstance(value, bool):
                raise ParamError(name, f"{name} must be true or false ({spec['help']}), got {_fmt(value)}")
            out[name] = value
        else:
            out[name] = _check_stop(value)
    out["stop"] = _check_stop(out["stop"])
    return out


def check_fits(prompt_tokens, max_new_tokens, block_size):
    """prompt + max_new_tokens must fit the model's context; a ParamError says what to lower."""
    if prompt_tokens + max_new_tokens <= block_size:
        return
    if prompt_tokens >= block_size:
        raise ParamError("prompt", f"prompt is {prompt_tokens} tokens; this model reads at most {block_size} "
                                   f"tokens in all (block_size), so the prompt must be under {block_size} tokens")
    raise ParamError("max_new_tokens", f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                                       f"{prompt_tokens + max_new_tokens} is more than the model's block_size "
                                       f"{block_size}; max_new_tokens can be at most {block_size - prompt_tokens} "
                                       f"for this prompt")


def encode_prompt(prompt, raw=False):
    """Prompt text -> token ids: the instruction template (prompt.format_prompt) unless raw.

    An empty raw prompt becomes [<|endoftext|>], the start-of-document token GPT-2 was trained on.
    """
    if not isinstance(prompt, str):
        raise ParamError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    ids = encode(prompt if raw else format_prompt(prompt))
    return ids or [EOT_ID]


def count_tokens(prompt, raw=False):
    """How many tokens the model reads for this prompt (the usage's prompt_tokens)."""
    return len(encode_prompt(prompt, raw))


# ====================================================================== text assembly


class StopFilter:
    """Cuts text at the first stop string, holding back any tail that could still start one.

    push(text) -> (text safe to emit, hit); once hit, everything from the stop string on is dropped.
    Of several stop strings the one that completes first wins (then the one that starts first).
    The held-back tail is always a proper prefix of some stop string, so a match can never start
    inside text already emitted.
    """

    def __init__(self, stops=()):
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text):
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        # the stop string that completes first (as if text came a character at a time) wins
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)[1]], True
        hold = self._held_tail(buf)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def _held_tail(self, buf):
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def utf8_decoder():
    """Incremental UTF-8 decoder: holds back the bytes of an unfinished character, replaces invalid ones."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class _Request:
    """Host-side state of one row: parameters, private RNG, text assembly, result."""

    def __init__(self, index, ids, params, should_stop=None):
        self.index = index
        self.ids = ids  # prompt token ids
        self.p = params
        seed = params["seed"] if params["seed"] is not None else secrets.randbits(63)
        self.rng = random.Random(seed)  # private: one uniform per generated token
        self.should_stop = should_stop
        self.decoder = utf8_decoder()
        self.stops = StopFilter(params["stop"])
        self.token_ids = []
        self.parts = []
        self.finish_reason = None
        self.t_start = time.perf_counter()
        self.t_first = self.t_end = None

    @property
    def done(self):
        return self.finish_reason is not None

    def remaining(self):
        return self.p["max_new_tokens"] - len(self.token_ids)

    def feed(self, token):
        """One generated id -> the text now safe to show (maybe ""); may finish the row."""
        self.token_ids.append(token)
        if token == EOT_ID and not self.p["ignore_eos"]:
            return self.finish("eos")
        text, hit = self.stops.push(self.decoder.decode(_token_bytes(token)))
        if hit:
            return self._emit(text, "stop")
        if self.remaining() <= 0:
            return self._emit(text) + self.finish("length")
        return self._emit(text)

    def finish(self, reason):
        """End the row: flush the decoder and the held-back text (a stop string may still complete)."""
        text, hit = self.stops.push(self.decoder.decode(b"", final=True))
        if not hit:
            text += self.stops.flush()
        return self._emit(text, "stop" if hit else reason)

    def _emit(self, text, reason=None):
        if text:
            self.parts.append(text)
        if reason is not None:
            self.finish_reason = reason
            self.t_end = time.perf_counter()
        return text

    def result(self):
        end = self.t_end or time.perf_counter()
        first = self.t_first or end
        decode_s = end - first
        n = len(self.token_ids)
        return {
            "text": "".join(self.parts),
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.ids),
            "completion_tokens": n,
            "token_ids": list(self.token_ids),
            "timings": {
                "prefill_ms": round((first - self.t_start) * 1e3, 3),
                "decode_ms": round(decode_s * 1e3, 3),
                "total_ms": round((end - self.t_start) * 1e3, 3),
                "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
            },
        }


_TOKEN_BYTES = {}


def _token_bytes(token):
    b = _TOKEN_BYTES.get(token)
    if b is None:
        b = _TOKEN_BYTES[token] = get_tokenizer().decode_single_token_bytes(token)
    return b


# ====================================================================== sampling (on device)


def sample_tokens(logits, seen, temperature, greedy, top_k, top_p, penalty, u, n_cand):
    """Pick the next id of every row, on the logits' device, without a host sync.

    logits (B, V') with V' >= N_VOCAB (padding columns are cut: ids >= N_VOCAB are never returned).
    seen (B, N_VOCAB) bool: tokens in the prompt or output (repetition penalty, CTRL-style:
    a positive logit is divided by the penalty, a negative one multiplied); None: no penalty.
    temperature, top_p, penalty (B, 1) float; greedy (B, 1) bool; top_k (B, 1) long, clipped to
    n_cand; u (B, 1) uniforms in [0, 1).
    n_cand (a Python int, so shapes stay fixed for CUDA graphs) says how the top-k / top-p cut-off
    is found: 0 = every row greedy, argmax only; -1 = no row filters (pure sampling, no sort);
    k < N_VOCAB = from torch.topk(k); N_VOCAB = from a full sort.
    The cut-off is a logit threshold; sampling is then inverse-CDF over the kept tokens in
    vocabulary order (the first id whose cumulative probability passes u * total), so the id a
    given u picks does not depend on which of those paths a batch took.
    """
    logits = logits[:, :N_VOCAB].float()  # (B, V)
    if seen is not None:
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    best = logits.argmax(dim=-1)  # (B,)
    if n_cand == 0:
        return best
    scaled = logits / temperature  # (B, V)
    if n_cand > 0:
        if n_cand < scaled.size(-1):
            vals = torch.topk(scaled, n_cand, dim=-1).values  # (B, n) descending
        else:
            vals = torch.sort(scaled, dim=-1, descending=True).values
        rank = torch.arange(n_cand, device=logits.device)  # (n,)
        vals = vals.masked_fill(rank >= top_k, float("-inf"))  # top-k
        probs = torch.softmax(vals, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability ranked above each candidate
        keep = (before < top_p) & (rank < top_k)  # top-p; the first candidate always stays
        threshold = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    cum = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # (B, V)
    total = cum[:, -1:]  # (B, 1), about 1
    last = (cum < total).sum(dim=-1, keepdim=True)  # (B, 1) the last id with probability
    choice = torch.minimum(torch.searchsorted(cum, u * total, right=True), last)  # (B, 1)
    return torch.where(greedy.squeeze(1), best, choice.squeeze(1))


def sampler_kind(params_list):
    """How a batch samples: (n_cand, penalize), fixed for the batch (part of a CUDA graph's key).

    n_cand (see sample_tokens): 0 if every row is greedy; -1 if no sampled row filters;
    TOPK_CANDIDATES if every filtering is a top_k within it; else N_VOCAB (full sort).
    penalize: some row has a repetition penalty (otherwise its ops and the seen set are skipped).
    """
    penalize = any(p["repetition_penalty"] != 1.0 for p in params_list)
    sampled = [p for p in params_list if p["temperature"] > 0]
    if not sampled:
        return 0, penalize
    if all(p["top_k"] in (0, N_VOCAB) and p["top_p"] >= 1.0 for p in sampled):
        return -1, penalize
    if all(1 <= p["top_k"] <= TOPK_CANDIDATES for p in sampled):
        return TOPK_CANDIDATES, penalize
    return N_VOCAB, penalize


class _Batch:
    """Device-side state of one decode batch of B rows (some may be idle padding rows).

    Every tensor is allocated once and only written in place, so CUDA graphs can read them.
    tok (B, 1) next input ids; pos (1,) its cache slot (static mode); pad (B,) left padding;
    seen (B, N_VOCAB); sampling parameters (B, 1); u (K, B) uniforms of this chunk; j (1,) step
    within the chunk; out (K, B) sampled ids of this chunk; on CUDA, host_out (2, K, B) pinned
    host copies of `out` (two, so one chunk can be read while the next runs).
    KV-cache: eager mode, `cache`, a KVCache of cache_len slots. Static mode, `view(length)`: a
    KVCache whose k / v are lists of per-layer contiguous (B, H, length, D) tensors laid over one
    of two flat buffers (ping-pong by bucket parity, so moving to the next bucket is one copy
    between buffers).
    """

    def __init__(self, model_config, B, cache_len, device, dtype, kmax, static=False):
        from model import KVCache

        self.B, self.kmax, self.device = B, kmax, device
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.tok = torch.zeros(B, 1, **long)
        self.pos = torch.zeros(1, **long)
        self.pad = torch.zeros(B, **long)
        self.seen = torch.zeros(B, N_VOCAB, dtype=torch.bool, device=device)
        self.temperature = torch.ones(B, 1, **f32)
        self.greedy = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.top_k = torch.ones(B, 1, **long)
        self.top_p = torch.ones(B, 1, **f32)
        self.penalty = torch.ones(B, 1, **f32)
        self.u = torch.zeros(kmax, B, **f32)
        self.j = torch.zeros(1, **long)
        self.out = torch.zeros(kmax, B, **long)
        self.host_out = torch.zeros(2, kmax, B, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
        self._next_host = 0
        cfg = model_config
        self._shape = (cfg.n_layer, B, cfg.n_head, cfg.n_embd // cfg.n_head)  # (n_layer, B, H, D)
        if static:
            n = cfg.n_layer * B * cfg.n_embd * cache_len
            # zeros: stale slots are masked, but must stay finite (0 * NaN would poison attention)
            self._flat = [(torch.zeros(n, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype))
                          for _ in range(2)]
            self._template = KVCache(cfg, 1, 1, device=device, dtype=dtype)
            self.cache = None
        else:
            self.cache = KVCache(cfg, B, cache_len, device=device, dtype=dtype)
            self.cache.pad = self.pad  # the same tensor: updated in place
        self._views = {}
        self.bucket = None

    def view(self, length):
        """Static mode: a KVCache of `length` slots over the flat buffers of this length's parity.

        k and v are lists of per-layer contiguous (B, H, length, D) tensors (the model reads
        kv_cache.k[i]): torch.compile writes those in place, whereas mutating a select of one
        stacked (n_layer, ...) tensor makes it copy the whole cache in and out every step.
        """
        v = self._views.get(length)
        if v is None:
            n_layer, B, H, D = self._shape
            k_flat, v_flat = self._flat[(-(-length // self.bucket)) % 2]
            per = B * H * length * D
            v = copy.copy(self._template)
            v.k = [k_flat[i * per:(i + 1) * per].view(B, H, length, D) for i in range(n_layer)]
            v.v = [v_flat[i * per:(i + 1) * per].view(B, H, length, D) for i in range(n_layer)]
            v.max_len, v.pad, v.pos = length, self.pad, 0
            self._views[length] = v
        return v

    def relayout(self, src_len, dst_len, filled):
        """Copy the first `filled` slots of every row from the src_len layout to the dst_len one."""
        src, dst = self.view(src_len), self.view(dst_len)
        assert src.k[0].data_ptr() != dst.k[0].data_ptr(), "relayout needs buckets of different parity"
        for s, d in zip(src.k + src.v, dst.k + dst.v):  # (B, H, L, D) each
            d[:, :, :filled].copy_(s[:, :, :filled])

    def set_rows(self, requests, n_cand):
        """Upload per-row sampling parameters; rows past len(requests) are idle (greedy, unpenalized)."""
        rows = []
        for r in requests:
            p = r.p
            greedy = p["temperature"] == 0
            n = n_cand if n_cand > 0 else N_VOCAB
            k = p["top_k"] if 1 <= p["top_k"] <= n else n
            rows.append((1.0 if greedy else p["temperature"], greedy, k,
                         p["top_p"] if p["top_p"] < 1.0 else 2.0,  # 2.0: top-p off, free of rounding
                         p["repetition_penalty"]))
        rows += [(1.0, True, 1, 2.0, 1.0)] * (self.B - len(rows))
        temp, greedy, k, top_p, pen = zip(*rows)
        self.temperature.copy_(torch.tensor(temp).view(-1, 1))
        self.greedy.copy_(torch.tensor(greedy).view(-1, 1))
        self.top_k.copy_(torch.tensor(k).view(-1, 1))
        self.top_p.copy_(torch.tensor(top_p).view(-1, 1))
        self.penalty.copy_(torch.tensor(pen).view(-1, 1))

    def set_uniforms(self, requests, k, draw=True):
        """Draw k uniforms per running row from its private RNG (idle rows get 0) into u[:k]; reset j.

        draw=False (every row greedy): nothing is drawn, u is not read.
        """
        if draw:
            zeros = [0.0] * k
            u = [[r.rng.random() for _ in range(k)] if r is not None and not r.done else zeros for r in requests]
            u += [zeros] * (self.B - len(u))
            self.u[:k].copy_(torch.tensor(u, dtype=torch.float32).t())  # (k, B)
        self.j.zero_()

    def fetch(self, k):
        """The ids sampled by the last k steps: a _Fetched whose tokens() is a (k, B) list.

        On CUDA the copy to pinned host memory is queued behind those steps (no wait here), so the
        host can queue more steps before it reads these.
        """
        if self.host_out is None:
            return _Fetched(self.out[:k].clone())
        host = self.host_out[self._next_host, :k]
        self._next_host ^= 1
        host.copy_(self.out[:k], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Fetched(host, event)


class _Fetched:
    """Sampled ids on their way to the host; tokens() waits for them (the one sync of a chunk)."""

    def __init__(self, ids, event=None):
        self.ids, self.event = ids, event

    def tokens(self):
        if self.event is not None:
            self.event.synchronize()
        return self.ids.tolist()


def _record(batch, logits, kind):
    """Sample from the last position's logits (B, V') and write the result into the batch state.

    kind: (n_cand, penalize) from sampler_kind.
    """
    n_cand, penalize = kind
    u = batch.u.index_select(0, batch.j).view(-1, 1)  # (B, 1): this step's uniforms
    nxt = sample_tokens(logits, batch.seen if penalize else None, batch.temperature, batch.greedy, batch.top_k,
                        batch.top_p, batch.penalty, u, n_cand)  # (B,)
    batch.out.index_copy_(0, batch.j, nxt.view(1, -1))
    if penalize:
        batch.seen.scatter_(1, nxt.view(-1, 1), True)
    batch.tok.copy_(nxt.view(-1, 1))
    batch.j.add_(1)


def _decode_step(forward, batch, cache, static, kind):
    """One decode step for every row: the unit captured in a CUDA graph. No host sync, no allocation
    visible outside (all results land in batch's tensors)."""
    logits, _ = forward(batch.tok, kv_cache=cache, input_pos=batch.pos if static else None)  # (B, 1, V')
    if static:
        batch.pos.add_(1)
    _record(batch, logits[:, -1], kind)


# ====================================================================== engine


def _call_model(model, idx, kv_cache, input_pos):
    """model(...) as a function of the model, so a compiled copy holds no reference to it."""
    return model(idx, kv_cache=kv_cache, input_pos=input_pos)


def _accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled code, and its recompile limit, per
    code object, so each engine's compiled forward gets its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


def _model_device_dtype(model):
    """Device and compute dtype of a model (a quantized model keeps float embeddings)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("model has no floating-point parameters")


def _pow2_at_least(n):
    return 1 << max(0, (n - 1).bit_length())


class Engine:
    """Runs generations for one model: keeps decode state, CUDA graphs and a lock between calls.

    mode: "eager" | "static" | "graphs" (see the module docstring); default graphs on CUDA, else eager.
    compile: torch.compile the model forward used by the static / graph decode step (CUDA).
    chunk: decode steps between host reads (default 8 on CUDA, 1 elsewhere).
    bucket: static cache lengths are multiples of this (capped at block_size).
    max_batch: rows decoded together at most; larger lists run in several groups.
    pipeline: static / graphs modes queue the next chunk before reading the current one
    (default: on CUDA, where it keeps the device busy while the host makes text).
    """

    def __init__(self, model, mode=None, compile=False, chunk=None, bucket=128, max_batch=64, pipeline=None):
        self._model = weakref.ref(model)  # engines are kept per model in a WeakKeyDictionary
        self.config = model.config
        self.device, self.dtype = _model_device_dtype(model)
        on_cuda = self.device.type == "cuda"
        self.mode = mode or ("graphs" if on_cuda else "eager")
        if self.mode not in ("eager", "static", "graphs"):
            raise ValueError(f"mode must be eager, static or graphs, got {self.mode!r}")
        if self.mode == "graphs" and not on_cuda:
            raise ValueError("mode='graphs' (CUDA graphs) needs a model on a CUDA device")
        self.chunk = chunk or (8 if on_cuda else 1)
        self.bucket = bucket
        self.max_batch = max_batch
        self.pipeline = on_cuda if pipeline is None else bool(pipeline)
        self.compile = bool(compile) and self.mode != "eager"
        self._compiled = torch.compile(_own_copy(_call_model)) if self.compile else None
        self._prefill_kwargs = {"last_only": True} if _accepts(model.forward, "last_only") else {}
        self.lock = threading.RLock()  # static/graph state is shared: one generation group at a time
        self._slots = {}  # B -> _Batch with a block_size cache (static / graphs)
        self._graphs = {}  # (B, cache length, sampler kind) -> torch.cuda.CUDAGraph
        self._pool = None
        self.notes = []  # fallbacks taken (shown by describe())

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this engine no longer exists")
        return model

    def forward(self, idx, kv_cache=None, input_pos=None):
        """The model's forward, compiled when asked (the decode step)."""
        return (self._compiled or _call_model)(self.model, idx, kv_cache, input_pos)

    def prefill_forward(self, idx, kv_cache, input_pos=None):
        """The model's forward for a prompt (never compiled: its shapes vary). Only the last
        position's logits are needed: when GPT.forward accepts last_only=True, the lm_head runs on
        that position alone (B x V x C work instead of B x W x V x C)."""
        return self.model(idx, kv_cache=kv_cache, input_pos=input_pos, **self._prefill_kwargs)

    def describe(self):
        return {"decode_mode": self.mode, "compile": self.compile, "chunk": self.chunk, "pipeline": self.pipeline,
                "cache_bucket": self.bucket, "graphs_captured": len(self._graphs), "notes": list(self.notes)}

    # -------------------------------------------------------------- grouping and the host loop

    def run(self, requests):
        """Generate for every request; yields (request, text piece) and (request, None) when it ends."""
        for group in self._plan_groups(requests):
            if self.mode == "eager":
                yield from self._run_group(group, _EagerRunner(self, group))
            else:
                with self.lock:
                    yield from self._run_group(group, _StaticRunner(self, group))

    def _plan_groups(self, requests):
        """Rows sorted by prompt length, cut so that width + max(max_new_tokens) fits the block."""
        groups, cur = [], []
        for r in sorted(requests, key=lambda r: len(r.ids)):
            cand = cur + [r]
            need = len(r.ids) + max(c.p["max_new_tokens"] for c in cand)
            if cur and (len(cand) > self.max_batch or need > self.config.block_size):
                groups.append(cur)
                cand = [r]
            cur = cand
        return groups + ([cur] if cur else [])

    def _run_group(self, group, runner):
        """Prefill, then decode chunk by chunk until every row has finished.

        With a pipelined runner (CUDA) the next chunk is queued before the current one is read,
        so the device keeps decoding while the host turns ids into text. Rows that end inside a
        chunk cost the rest of it; finished rows are compacted out only with nothing in flight.
        """
        try:
            for r in group:
                r.t_start = time.perf_counter()
            yield from self._cancel_requested(group)
            if all(r.done for r in group):
                return
            yield from self._consume(runner, runner.prefill(), group)
            inflight, ahead = None, 0  # the queued chunk and how many steps it holds
            while True:
                yield from self._cancel_requested(group)
                live = [r for r in group if not r.done]
                if not live:
                    break
                if inflight is None:
                    runner.maybe_compact()
                    ahead = min(self.chunk, max(r.remaining() for r in live))
                    inflight = runner.decode(ahead)
                left = max(r.remaining() for r in live) - ahead
                queued = None
                if runner.pipelined and left > 0 and not runner.wants_compaction():
                    queued_k = min(self.chunk, left)
                    queued = runner.decode(queued_k)
                yield from self._consume(runner, inflight.tokens(), group)
                inflight, ahead = (queued, queued_k) if queued is not None else (None, 0)
        finally:
            runner.close()

    def _cancel_requested(self, group):
        for r in group:
            if not r.done and r.should_stop is not None and r.should_stop():
                yield r, r.finish("cancelled")
                yield r, None

    def _consume(self, runner, tokens, group):
        """Feed a chunk of sampled ids (K, B) row by row, token by token; yield text and finishes."""
        now = time.perf_counter()
        for step in tokens:
            for row, r in enumerate(runner.rows):
                if r is None or r.done:
                    continue
                if r.t_first is None:
                    r.t_first = now
                piece = r.feed(step[row])
                if piece:
                    yield r, piece
                if r.done:
                    yield r, None

    # -------------------------------------------------------------- static slots and CUDA graphs

    def slot(self, B):
        """The persistent _Batch for B rows (static / graphs), with a cache of block_size slots."""
        s = self._slots.get(B)
        if s is None:
            s = self._slots[B] = _Batch(self.config, B, self.config.block_size, self.device, self.dtype,
                                        max(self.chunk, 1), static=True)
            s.bucket = self.bucket
        return s

    def cache_len(self, slots):
        """Bucketed static cache length holding `slots` slots."""
        return min(self.config.block_size, -(-slots // self.bucket) * self.bucket)

    def step(self, batch, length, kind):
        """Run one decode step over a cache view of `length` slots: graph replay or direct call."""
        g = self._graphs.get((batch.B, length, kind)) if self.mode == "graphs" else None
        if g is not None:
            g.replay()
        else:
            _decode_step(self.forward, batch, batch.view(length), True, kind)

    def prepare_graphs(self, batch, lengths, kind):
        """Capture the decode step for each cache length not captured yet.

        Call only while the batch holds no live state: warm-up runs write into it.
        """
        if self.mode != "graphs":
            return
        for length in lengths:
            key = (batch.B, length, kind)
            if key in self._graphs:
                continue
            try:
                self._graphs[key] = self._capture(batch, length, kind)
            except Exception as e:  # keep serving: fall back, loudly
                if self.compile:
                    self._note(f"CUDA graph capture with torch.compile failed ({type(e).__name__}: {e}); "
                               "using the uncompiled forward")
                    self.compile, self._compiled = False, None
                    self._graphs.clear()
                    return self.prepare_graphs(batch, lengths, kind)
                self._note(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs")
                self.mode = "static"
                self._graphs.clear()
                return

    def _note(self, msg):
        self.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _capture(self, batch, length, kind):
        """Warm up (compiles if asked) on a side stream, then record one decode step in a graph."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        view = batch.view(length)

        def scratch():  # a harmless state: slot 0, token 0, step 0
            batch.pos.zero_()
            batch.tok.zero_()
            batch.j.zero_()

        scratch()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                _decode_step(self.forward, batch, view, True, kind)
                batch.j.zero_()
        torch.cuda.current_stream(self.device).wait_stream(side)
        scratch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            _decode_step(self.forward, batch, view, True, kind)
        scratch()
        torch.cuda.synchronize(self.device)
        return graph

    def warmup(self, batch_sizes=(1,), max_len=None, kinds=((0, False), (-1, False), (TOPK_CANDIDATES, False))):
        """Capture the CUDA graphs a server will need up front (no-op unless mode is graphs); returns
        how many graphs the engine holds. kinds: sampler kinds (see sampler_kind); the default covers
        greedy, pure sampling and top-k/top-p within TOPK_CANDIDATES, without repetition penalty
        (other kinds are captured on first use)."""
        if self.mode != "graphs":
            return 0
        max_len = max_len or self.config.block_size
        lengths = sorted({self.cache_len(n) for n in range(1, max_len + 1, self.bucket)} | {self.cache_len(max_len)})
        with self.lock:
            for B in batch_sizes:
                for kind in kinds:
                    self.prepare_graphs(self.slot(_pow2_at_least(B)), lengths, kind)
        return len(self._graphs)


class _EagerRunner:
    """A group decoded with the KVCache eager mode: exact batch size, cache of W + max_new - 1 slots."""

    pipelined = False

    def __init__(self, engine, group):
        self.engine = engine
        self.rows = list(group)
        self.width = max(len(r.ids) for r in group)
        cache_len = self.width + max(r.p["max_new_tokens"] for r in group) - 1
        self.kind = sampler_kind([r.p for r in group])
        self.batch = _Batch(engine.config, len(group), cache_len, engine.device, engine.dtype, engine.chunk)
        self.batch.set_rows(group, self.kind[0])
        pads = [self.width - len(r.ids) for r in group]
        self.batch.pad.copy_(torch.tensor(pads))
        self.batch.cache.pad = self.batch.pad if any(pads) else None  # no mask needed without padding

    @torch.no_grad()
    def prefill(self):
        idx = _left_padded(self.rows, self.width, self.batch.B, self.engine.device)  # (B, W)
        b = self.batch
        if self.kind[1]:  # repetition penalty: the prompt's tokens count
            b.seen.zero_()
            b.seen.scatter_(1, idx, True)
        b.set_uniforms(self.rows, 1, draw=self.kind[0] != 0)
        logits, _ = self.engine.prefill_forward(idx, b.cache)  # (B, W or 1, V')
        _record(b, logits[:, -1], self.kind)
        return b.out[:1].tolist()

    @torch.no_grad()
    def decode(self, k):
        """Run k steps; returns their ids (a _Fetched)."""
        b = self.batch
        b.set_uniforms(self.rows, k, draw=self.kind[0] != 0)
        for _ in range(k):
            _decode_step(self.engine.forward, b, b.cache, False, self.kind)
        return b.fetch(k)

    def wants_compaction(self):
        live = sum(not r.done for r in self.rows)
        return 0 < live <= self.batch.B // 2

    @torch.no_grad()
    def maybe_compact(self):
        """Drop finished rows once at most half the batch is still running."""
        if not self.wants_compaction():
            return
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        old, idx = self.batch, torch.tensor(keep, device=self.engine.device)
        new = copy.copy(old)
        for name in ("tok", "pad", "seen", "temperature", "greedy", "top_k", "top_p", "penalty"):
            setattr(new, name, getattr(old, name).index_select(0, idx))
        new.u, new.out = old.u[:, :len(keep)].clone(), old.out[:, :len(keep)].clone()
        if old.host_out is not None:
            new.host_out = old.host_out[:, :, :len(keep)].clone().pin_memory()
        new.B = len(keep)
        new.cache = copy.copy(old.cache)
        new.cache.k = old.cache.k.index_select(1, idx)  # (n_layer, B', H, L, D)
        new.cache.v = old.cache.v.index_select(1, idx)
        new.cache.pad = new.pad if old.cache.pad is not None else None
        self.batch, self.rows = new, [self.rows[i] for i in keep]

    def close(self):
        self.batch = None


class _StaticRunner:
    """A group decoded with the KVCache static mode on the engine's persistent slot of B rows
    (B = the next power of two; extra rows idle), bucketed cache lengths and, in graphs mode, replays."""

    def __init__(self, engine, group):
        self.engine = engine
        self.width = max(len(r.ids) for r in group)
        self.end = self.width + max(r.p["max_new_tokens"] for r in group) - 1  # slots used in all
        self.kind = sampler_kind([r.p for r in group])
        self.batch = self._take_slot(len(group), self.width)
        self.rows = list(group) + [None] * (self.batch.B - len(group))
        self.batch.set_rows(group, self.kind[0])
        self.batch.pad.copy_(torch.tensor([self.width - len(r.ids) for r in group] + [0] * (self.batch.B - len(group))))
        self.pos = self.width  # host mirror of batch.pos after prefill: the slot the next step writes
        self.length = engine.cache_len(self.width)  # cache layout in use

    def _take_slot(self, n_rows, first_slot):
        """The slot for n_rows, with graphs ready for every cache bucket from first_slot to the end."""
        e = self.engine
        batch = e.slot(_pow2_at_least(n_rows))
        lengths = sorted({e.cache_len(s + 1) for s in range(first_slot, self.end)})
        e.prepare_graphs(batch, lengths, self.kind)  # before any state is written into the slot
        return batch

    @torch.no_grad()
    def prefill(self):
        e, b = self.engine, self.batch
        idx = _left_padded([r for r in self.rows if r is not None], self.width, b.B, e.device)  # (B, W)
        if self.kind[1]:  # repetition penalty: the prompt's tokens count
            b.seen.zero_()
            b.seen.scatter_(1, idx, True)
        b.set_uniforms(self.rows, 1, draw=self.kind[0] != 0)
        input_pos = torch.arange(self.width, device=e.device)
        logits, _ = e.prefill_forward(idx, b.view(self.length), input_pos)  # (B, W or 1, V')
        b.pos.fill_(self.width)
        _record(b, logits[:, -1], self.kind)
        return b.out[:1].tolist()

    @property
    def pipelined(self):
        return self.engine.pipeline

    @torch.no_grad()
    def decode(self, k):
        """Queue k steps (no host sync); returns their ids as a _Fetched.

        A step writes slot self.pos, so it needs a cache of at least self.pos + 1 slots.
        """
        e, b = self.engine, self.batch
        b.set_uniforms(self.rows, k, draw=self.kind[0] != 0)
        for _ in range(k):
            length = e.cache_len(self.pos + 1)
            if length != self.length:  # next bucket: move the filled slots to its layout
                b.relayout(self.length, length, self.pos)
                self.length = length
            e.step(b, length, self.kind)
            self.pos += 1
        return b.fetch(k)

    def wants_compaction(self):
        live = sum(r is not None and not r.done for r in self.rows)
        return live > 0 and _pow2_at_least(live) < self.batch.B

    @torch.no_grad()
    def maybe_compact(self):
        """Move running rows to a smaller slot once at most half of this one is busy."""
        if not self.wants_compaction():
            return
        keep = [i for i, r in enumerate(self.rows) if r is not None and not r.done]
        old = self.batch
        new = self._take_slot(len(keep), self.pos)
        idx = torch.tensor(keep, device=self.engine.device)
        n = len(keep)
        for name in ("tok", "pad", "seen", "temperature", "greedy", "top_k", "top_p", "penalty"):
            getattr(new, name)[:n].copy_(getattr(old, name).index_select(0, idx))
        new.pad[n:].zero_()
        new.greedy[n:].fill_(True)
        new.penalty[n:].fill_(1.0)
        new.temperature[n:].fill_(1.0)
        new.pos.copy_(old.pos)
        src, dst = old.view(self.length), new.view(self.length)  # same length, per layer (B, H, L, D)
        for s, d in zip(src.k + src.v, dst.k + dst.v):
            d[:n, :, :self.pos].copy_(s[:, :, :self.pos].index_select(0, idx))
        self.batch = new
        self.rows = [self.rows[i] for i in keep] + [None] * (new.B - n)

    def close(self):
        self.batch = None


def _left_padded(requests, width, B, device):
    """(B, W) prompt ids, right-aligned; padding repeats the row's first token (masked anyway, and
    harmless in the repetition-penalty set). Idle rows are all EOT."""
    rows = [[r.ids[0]] * (width - len(r.ids)) + list(r.ids) for r in requests]
    rows += [[EOT_ID] * width] * (B - len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


_ENGINES = weakref.WeakKeyDictionary()


def configure_engine(model, **options):
    """(Re)build the engine of a model with Engine options (mode, compile, chunk, bucket, max_batch,
    pipeline); generate_* then use it."""
    engine = Engine(model, **options)
    engine.options = options
    _ENGINES[model] = engine
    return engine


def get_engine(model):
    """The model's engine: created with defaults on first use, rebuilt (same options) if the model
    has moved to another device or dtype since."""
    engine = _ENGINES.get(model)
    if engine is None:
        return configure_engine(model)
    if (engine.device, engine.dtype) != _model_device_dtype(model):
        options = dict(engine.options)
        if options.get("mode") == "graphs" and _model_device_dtype(model)[0].type != "cuda":
            options.pop("mode")
        return configure_engine(model, **options)
    return engine


# ====================================================================== public generation API


def _make_requests(model, prompts, params, should_stop):
    """Validate everything up front (any bad value raises before work starts) -> _Request list."""
    n = len(prompts)
    per_row = []
    for name, value in params.items():
        if isinstance(value, (list, tuple)) and name != "stop" or (name == "stop" and _is_per_row_stop(value, n)):
            if len(value) != n:
                raise ParamError(name, f"{name} has {len(value)} values for {n} prompts")
            per_row.append(name)
    stops = should_stop if isinstance(should_stop, (list, tuple)) else [should_stop] * n
    if len(stops) != n:
        raise ParamError("should_stop", f"should_stop has {len(stops)} callables for {n} prompts")
    requests = []
    for i, prompt in enumerate(prompts):
        row = {k: (v[i] if k in per_row else v) for k, v in params.items()}
        p = validate_params(**row)
        ids = encode_prompt(prompt, p["raw"])
        check_fits(len(ids), p["max_new_tokens"], model.config.block_size)
        requests.append(_Request(i, ids, p, stops[i]))
    return requests


def _is_per_row_stop(value, n):
    """stop given per row: a list of n entries, each None, a string list or ... (not a list of strings)."""
    return isinstance(value, (list, tuple)) and len(value) == n and n > 0 and any(
        v is None or isinstance(v, (list, tuple)) for v in value)


def stream_batch(model, prompts, should_stop=None, **params):
    """Generate for several prompts at once; returns an iterator of events as text becomes safe to show.

    Each parameter (see PARAM_RANGES) is one value for all rows or a list with one per prompt
    (for stop: a list of per-row lists). should_stop: a callable, or one per prompt, polled every
    chunk; when it returns True that row ends with finish_reason "cancelled".
    Events: {"index": i, "text": piece} then, once per row, {"index": i, "done": True, **result}.
    Every parameter is checked here, before any work: a ParamError (ValueError) at the call.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ParamError("prompts", "prompts must be a list of strings")
    return _events(model, _make_requests(model, prompts, params, should_stop))


def generate_batch(model, prompts, should_stop=None, **params):
    """Like generate_text for a list of prompts (different lengths fine), decoded together.

    Returns one result dict per prompt, in order. Greedy results equal one-at-a-time generation.
    """
    results = [None] * len(prompts)
    for event in stream_batch(model, prompts, should_stop=should_stop, **params):
        if event.get("done"):
            results[event["index"]] = {k: v for k, v in event.items() if k not in ("index", "done")}
    return results


def stream_text(model, prompt, should_stop=None, **params):
    """An iterator of the generated text in pieces: never a broken UTF-8 character, never any part
    of a stop string. Parameters as generate_text; they are checked at the call (ParamError)."""
    events = _events(model, _make_requests(model, [prompt], params, should_stop))
    return (event["text"] for event in events if not event.get("done"))


def _events(model, requests):
    for r, piece in get_engine(model).run(requests):
        yield {"index": r.index, "done": True, **r.result()} if piece is None else {"index": r.index, "text": piece}


def generate_text(model, prompt, max_new_tokens=128, temperature=0.8, top_k=50, top_p=1.0,
                  repetition_penalty=1.0, stop=None, seed=None, raw=False, should_stop=None, ignore_eos=False):
    """Generate a completion for one prompt.

    Returns {"text", "finish_reason": "eos"|"stop"|"length"|"cancelled", "prompt_tokens",
    "completion_tokens", "token_ids", "timings"}. completion_tokens counts every generated token,
    including a final <|endoftext|> and the token that completed a stop string; text excludes both.
    """
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=stop, seed=seed, raw=raw, ignore_eos=ignore_eos)
    result = None
    for event in _events(model, _make_requests(model, [prompt], params, should_stop)):
        if event.get("done"):
            result = {k: v for k, v in event.items() if k not in ("index", "done")}
    return result


# ====================================================================== loading


def quantize_int8(model):
    """Dynamic int8 quantization of every nn.Linear (in place), for CPU inference.

    Weights int8 per output channel, activations quantized per call (fbgemm / x86 kernels via
    torch.ao.quantization.quantize_dynamic: deprecated upstream but present and fast in torch 2.11
    and 2.13; the tied lm_head gets its own int8 copy, the embedding stays float).
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:
        raise UserError(f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic; "
                        "run without --quantize") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao and quantized dtypes
        try:
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        except RuntimeError:  # an engine without per-channel dynamic linear: per-tensor scales
            quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


class InOutLinear(nn.Module):
    """nn.Linear with its weight stored (in, out), as GPT-2's Conv1D: y = x @ W_t + b.

    Single-row matmuls (decoding) read this layout about 1.8x faster than (out, in) on the CPU
    BLAS here (the 154 MB lm_head: 7.0 ms against 12.4 ms), and decoding is bound by those reads.
    """

    def __init__(self, linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):  # (..., in) -> (..., out)
        flat = x.reshape(-1, x.size(-1))
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


class TiedEmbedding(nn.Module):
    """The token embedding read from a tied InOutLinear lm_head's (C, V) weight: no second copy."""

    def __init__(self, weight_t):
        super().__init__()
        self.weight_t = weight_t  # the lm_head's parameter, shared

    def forward(self, idx):
        return nn.functional.embedding(idx, self.weight_t.t())  # rows of the (V, C) view


def use_in_out_layout(model):
    """Replace every nn.Linear by an InOutLinear (in place; for CPU inference, not for training or
    saving: parameter names change). A tied GPT embedding reads the lm_head's new weight."""
    tied = getattr(model, "lm_head", None) is not None and \
        model.lm_head.weight is getattr(getattr(model, "transformer", None), "wte", nn.Embedding(1, 1)).weight
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, InOutLinear(child))
    if tied:
        model.transformer.wte = TiedEmbedding(model.lm_head.weight_t)
    return model


def prepare_model(model, device, dtype, quantize=None):
    """Ready a model for generation, in place: eval, no grads, on device in dtype; quantize="int8"
    for dynamic int8 Linears (CPU, fp32); other CPU models get the (in, out) weight layout."""
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if quantize == "int8":
        quantize_int8(model)
    elif torch.device(device).type == "cpu":
        use_in_out_layout(model)
    return model


def load_weights(path):
    """-> (model on CPU in fp32, info dict) from our checkpoint, an HF folder or an OpenAI name."""
    from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint
    from model import GPT, PRETRAINED_CONFIGS

    path = os.fspath(path)
    is_ours = os.path.isfile(path) or os.path.isfile(os.path.join(path, CKPT_NAME))
    if is_ours:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        full = os.path.abspath(path)
        folder = full if os.path.isdir(full) else os.path.dirname(full)
        info = {"model": os.path.basename(folder) or full, "path": full, "kind": ckpt["kind"],
                "step": ckpt.get("step"), "metrics": ckpt.get("metrics") or {}}
        del ckpt
    elif os.path.isdir(path) or path in PRETRAINED_CONFIGS:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} holds neither {CKPT_NAME} nor an HF model (config.json)")
        try:
            model = GPT.from_pretrained(path)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
            raise UserError(f"cannot load {path!r}: {e}") from None
        local = os.path.isdir(path)
        full = os.path.abspath(path) if local else path
        info = {"model": os.path.basename(full.rstrip("/")) if local else path, "path": full,
                "kind": "hf" if local else "openai", "step": None, "metrics": {}}
    else:
        raise UserError(f"model not found: {path!r} (expected a {CKPT_NAME} file, a folder holding one, an HF "
                        f"GPT-2 folder, or one of {', '.join(PRETRAINED_CONFIGS)})")
    return model, info


def load_model_from_checkpoint(path, device=None, dtype=None, quantize=None, compile=None, decode_mode=None):
    """Load a model ready for generation -> (model, info).

    path: a ckpt.pt, the folder holding it, a local HF GPT-2 folder, or an OpenAI GPT-2 name
    (`gpt2`, ...; needs the network). device: None/"auto" = CUDA > MPS > CPU. dtype: None/"auto" =
    bf16 on CUDA, fp32 elsewhere. quantize: None or "int8" (CPU, fp32: dynamic int8 Linears).
    On CPU the Linears take the (in, out) layout (InOutLinear): the model is for inference only.
    compile: torch.compile the decode step (default: on for CUDA graphs). decode_mode: Engine mode.
    Bad input raises common.UserError with a one-line message.
    """
    try:
        device = pick_device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    dtype = pick_dtype(dtype, device)
    if quantize not in (None, "none", "int8"):
        raise UserError(f"quantize must be 'int8' or none, got {quantize!r}")
    quantize = None if quantize == "none" else quantize
    if quantize == "int8" and (device.type != "cpu" or dtype != torch.float32):
        raise UserError(f"quantize=int8 runs on CPU in float32 only (asked: {device.type}, {dtype})")
    model, info = load_weights(path)
    n_params = model.num_params()
    prepare_model(model, device, dtype, quantize)
    if decode_mode is None and device.type == "cuda":
        decode_mode = "graphs"
    if compile is None:
        compile = decode_mode == "graphs"
    engine = configure_engine(model, mode=decode_mode, compile=compile)
    cfg = model.config
    info.update({
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "quantize": quantize,
        "n_params": n_params, "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "instruction_tuned": info["kind"] == "sft", **engine.describe(),
    })
    return model, info


# ====================================================================== CLI


def _flag_help(name):
    spec = PARAM_RANGES[name]
    hi = "" if spec["max"] is None else f", at most {spec['max']}"
    return f"{spec['help']} ({'above' if spec.get('min_exclusive') else 'at least'} {spec['min']}{hi})"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (through UserError / run_cli)."""

    def error(self, message):
        raise UserError(message)


def build_parser():
    p = _Parser(description="Generate text with a gpt2-instruct model (our ckpt.pt, an HF GPT-2 folder, or gpt2).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt, a folder holding it, an HF GPT-2 folder, or gpt2")
    p.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw); '-' reads stdin")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the instruction template")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help=_flag_help("max_new_tokens"))
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help=_flag_help("temperature"))
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help=_flag_help("top_k"))
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help=_flag_help("top_p"))
    p.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"],
                   help=_flag_help("repetition_penalty"))
    p.add_argument("--stop", action="append", default=None,
                   help=f"stop string; repeat for several (at most {MAX_STOP_STRINGS}); not included in the output")
    p.add_argument("--seed", type=int, default=None, help=_flag_help("seed"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic int8 Linears (CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: torch's choice)")
    p.add_argument("--decode-mode", choices=["eager", "static", "graphs"], default=None,
                   help="None: graphs on CUDA, eager elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the CUDA-graph decode step (slow first call, faster decoding)")
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                  seed=args.seed, raw=args.raw)
    try:
        validate_params(**params)  # fail fast, before loading the model
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, info = load_model_from_checkpoint(args.ckpt, device=args.device, dtype=args.dtype,
                                             quantize=args.quantize, compile=args.compile,
                                             decode_mode=args.decode_mode)
    try:
        if args.stream:
            result = None
            for event in stream_batch(model, [prompt], **params):
                if event.get("done"):
                    result = event
                else:
                    print(event["text"], end="", flush=True)
            print()
        else:
            result = generate_text(model, prompt, **params)
            print(result["text"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.verbose:
        t = result["timings"]
        print(f"[{info['model']} on {info['device']} {info['dtype']}: finish_reason={result['finish_reason']} "
              f"prompt_tokens={result['prompt_tokens']} completion_tokens={result['completion_tokens']} "
              f"prefill {t['prefill_ms']:.0f} ms, decode {t['decode_tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
