"""Text generation for our GPT: one continuously batching Engine, its sampler, text assembly, loading, CLI.

    engine = Engine(model, max_batch=64, prefill_chunk=512)
    req = engine.add(prompt_ids, validate_params(temperature=0.7, seed=1), n=1, logprobs=None, echo=False)
    while engine.has_work(): for out in engine.step(): ...       # Output: text, token_ids, finish_reason, ...
    generate_text(model, prompt, **params), stream_text(...), generate_batch(model, prompts, **params)
CLI: python inference.py --ckpt PATH --prompt TEXT [--stream] [--raw] [sampling flags]  (--help)

How the engine runs (nanochat / vLLM style, one code path for every device):
- The KV-cache has max_batch slots (model.KVCache); a request takes n slots (one per choice) and
  keeps them until it finishes, each row at its own position.
- step() = at most prefill_chunk prompt tokens of prefill (waiting requests join then; a long
  prompt takes several steps) + one decode chunk of K steps for every running row, then one host
  sync to read the K sampled ids of each row. On CUDA the chunk is queued before the previous
  one is read (pipelined), so the GPU keeps working while the host makes text.
- The decode step has fixed shapes for a (batch bucket, cache-length bucket, sampler kind): on
  CUDA it is captured in a CUDA graph per key (optionally torch.compile'd first); "static" runs
  the same bucketed logic uncaptured (CPU tests); otherwise shapes are exact (CPU default).
- Sampling happens on the device from per-slot parameter rows, with one uniform per token drawn
  on the host from the choice's private random.Random(seed): a choice's tokens do not depend on
  the batch it runs in, the device path taken or the global RNG.

Shapes: S slots, B rows of a decode batch (slots 0..B-1), K steps per chunk, V vocab (ids >=
N_VOCAB, the padding of the embedding, are never sampled), L cache positions read.
"""

import argparse
import codecs
import heapq
import itertools
import math
import random
import secrets
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import load_model
from common import UserError, pick_device, pick_dtype, run_cli
from model import KVCache
from prompt import format_prompt
from tokenizer import EOT_ID, N_VOCAB, encode, get_tokenizer

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token
TOPK_CANDIDATES = 256  # batches whose top_k are all within this sample from torch.topk, not a full sort
GREEDY_BELOW = 1e-4  # temperatures under this are greedy: dividing by them would overflow float32
SEED_MAX = 2**63 - 1
CACHE_BUCKET = 128  # static / graph decode reads a multiple of this many cache positions
# Prefill and embed attention: not cuDNN, torch's first choice on Hopper, which builds a plan for every new
# shape (about 70 ms on an H200) and so would delay the first token of each new prompt width by that much.
# Decode keeps it: its shapes are bucketed and captured up front, and there it is faster (H200, graphs,
# batch 64: 68.7k against 54.2k decode tokens/s without it).
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Allowed values of every generation parameter: validate_params enforces them, the server and the
# chat page read them (400 messages, form limits). "max": None means "limited by the model":
# prompt tokens + max_new_tokens <= block_size.
PARAM_RANGES = {
    "max_new_tokens": {"type": "int", "min": 0, "max": None, "default": 128,
                       "help": "most tokens to generate (0 only with echo); prompt tokens + max_new_tokens "
                               "<= the model's block_size"},
    "temperature": {"type": "float", "min": 0.0, "max": 2.0, "default": 0.8,
                    "help": f"0 (or under {GREEDY_BELOW}) = greedy, always the most likely token"},
    "top_k": {"type": "int", "min": 0, "max": N_VOCAB, "default": 50,
              "help": "sample from the k most likely tokens; 0 = no limit"},
    "top_p": {"type": "float", "min": 0.0, "max": 1.0, "min_exclusive": True, "default": 1.0,
              "help": "nucleus sampling: the smallest set of tokens with this much probability; 1 = off"},
    "min_p": {"type": "float", "min": 0.0, "max": 1.0, "default": 0.0,
              "help": "drop tokens less likely than min_p times the most likely one; 0 = off"},
    "repetition_penalty": {"type": "float", "min": 1.0, "max": 2.0, "default": 1.0,
                           "help": "CTRL-style penalty on tokens already in the prompt or output; 1 = off"},
    "presence_penalty": {"type": "float", "min": -2.0, "max": 2.0, "default": 0.0,
                         "help": "subtracted from the logit of every token already generated (OpenAI); 0 = off"},
    "frequency_penalty": {"type": "float", "min": -2.0, "max": 2.0, "default": 0.0,
                          "help": "subtracted once per earlier occurrence in the output (OpenAI); 0 = off"},
    "logit_bias": {"type": "bias", "min": -100.0, "max": 100.0, "max_items": MAX_LOGIT_BIAS, "default": None,
                   "help": "{token id: bias} added to the logits; -100 bans a token, 100 forces it"},
    "stop": {"type": "stop", "max_items": MAX_STOP_STRINGS, "max_chars": MAX_STOP_CHARS, "default": None,
             "help": "a string or a list of strings; generation ends before the first one (not included)"},
    "seed": {"type": "int", "min": 0, "max": SEED_MAX, "default": None,
             "help": "same seed and inputs give the same text (choice i of n uses seed + i); null = random"},
    "raw": {"type": "bool", "default": False,
            "help": "send the prompt as is (base models) instead of the instruction template"},
    "ignore_eos": {"type": "bool", "default": False,
                   "help": "keep generating after <|endoftext|> (benchmarks)"},
}
DEFAULTS = {name: spec["default"] for name, spec in PARAM_RANGES.items()}


class ParamError(ValueError):
    """An invalid generation parameter; `param` names it (the server's 400 `param` field)."""

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


def _check_bias(value):
    """None or {token id (int or its decimal string, as JSON keys are): bias} -> {int: float}."""
    spec = PARAM_RANGES["logit_bias"]
    if value is None:
        return {}
    msg = (f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (0 to {N_VOCAB - 1}) to numbers between "
           f"{spec['min']} and {spec['max']}")
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ParamError("logit_bias", f"{msg}, got {_fmt(value)}")
    out = {}
    for key, bias in value.items():
        tok = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 7 else key
        ok = isinstance(tok, int) and not isinstance(tok, bool) and 0 <= tok < N_VOCAB
        ok = ok and isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
        if not ok or not spec["min"] <= bias <= spec["max"]:
            raise ParamError("logit_bias", f"{msg}, got {_fmt(key)}: {_fmt(bias)}")
        out[tok] = float(bias)
    return out


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
            out[name] = value
    out["stop"] = _check_stop(out["stop"])
    out["logit_bias"] = _check_bias(out["logit_bias"])
    return out


def check_fits(prompt_tokens, max_new_tokens, block_size):
    """prompt + max_new_tokens must fit the model's context; a ParamError says what to lower."""
    if prompt_tokens + max_new_tokens <= block_size:
        return
    if prompt_tokens >= block_size + (max_new_tokens == 0):
        raise ParamError("prompt", f"prompt is {prompt_tokens} tokens; this model reads at most {block_size} "
                                   f"tokens in all (block_size), so the prompt must be under {block_size} tokens")
    raise ParamError("max_new_tokens", f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                                       f"{prompt_tokens + max_new_tokens} is more than the model's block_size "
                                       f"{block_size}; max_new_tokens can be at most {block_size - prompt_tokens} "
                                       f"for this prompt")


def check_ids(ids, name="prompt"):
    """A non-empty list of token ids of the tokenizer -> list of int; else ParamError(name)."""
    ok = isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < N_VOCAB for t in ids)
    if not ok:
        raise ParamError(name, f"{name} must be a non-empty list of token ids between 0 and {N_VOCAB - 1}, "
                               f"got {_fmt(ids)}")
    return list(ids)


def check_request(prompt_ids, params, n, logprobs, echo, max_batch, block_size):
    """What Engine.add refuses, checked without an engine -> the prompt ids; raises ParamError."""
    ids = check_ids(prompt_ids)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_batch:
        raise ParamError("n", f"n must be an integer between 1 and {max_batch}, got {_fmt(n)}")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise ParamError("logprobs", f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, "
                                     f"got {_fmt(logprobs)}")
    if params["max_new_tokens"] == 0 and not echo:
        raise ParamError("max_new_tokens", "max_new_tokens must be at least 1 (0 only with echo)")
    check_fits(len(ids), params["max_new_tokens"], block_size)
    return ids


def encode_prompt(prompt, raw=False):
    """Prompt text -> token ids: the instruction template (prompt.format_prompt) unless raw.

    An empty raw prompt becomes [<|endoftext|>], the start-of-document token GPT-2 was trained on.
    """
    if not isinstance(prompt, str):
        raise ParamError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    ids = encode(prompt if raw else format_prompt(prompt))
    return ids or [EOT_ID]


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




_TOKEN_BYTES = {}


def _token_bytes(token):
    b = _TOKEN_BYTES.get(token)
    if b is None:
        b = _TOKEN_BYTES[token] = get_tokenizer().decode_single_token_bytes(token)
    return b


@dataclass
class Output:
    """What one step produced for one choice of a request: new text and ids, maybe its end."""

    request: "Request"
    index: int  # the choice
    text: str = ""  # new text: UTF-8 safe, stop strings held back
    token_ids: list = field(default_factory=list)  # new ids
    logprobs: list = None  # per new id {"token_id", "logprob", "top": [(id, logprob), ...]} if asked
    prompt_logprobs: list = None  # echo: on the first Output, one entry per prompt token, the first None
    finish_reason: str = None  # None while running; else "eos", "stop", "length" or "cancelled"
    usage: dict = None  # when finished: {"prompt_tokens", "completion_tokens"}


class Request:
    """The handle of one request: `id`, `tag` (whatever add got), `done` once every choice ended."""

    _ids = itertools.count()

    def __init__(self, ids, params, n, logprobs, echo, tag):
        self.id = next(Request._ids)
        self.tag, self.prompt, self.params, self.n, self.logprobs, self.echo = tag, ids, params, n, logprobs, echo
        self.choices = [_Choice(self, i) for i in range(n)]
        self.cancelled = False  # set by Engine.cancel (any thread); the loop ends the choices
        self.filled = 0  # prompt tokens prefilled so far
        self.prompt_lp = []  # echo: (logprob, top ids, top logprobs) device tensors, chunk by chunk

    @property
    def done(self):
        return all(c.finish_reason is not None for c in self.choices)


class _Choice:
    """One sequence of a request: its slot, private RNG and text assembly."""

    def __init__(self, request, index):
        p = request.params
        self.request, self.index, self.p = request, index, p
        seed = (p["seed"] + index) % (SEED_MAX + 1) if p["seed"] is not None else secrets.randbits(63)
        self.rng = random.Random(seed)  # private: one uniform per sampled token
        self.greedy = p["temperature"] < GREEDY_BELOW
        self.slot = None
        self.pos = 0  # host mirror of the slot's next cache position once decoding
        self.queued = 0  # tokens whose computation has been queued
        self.decoder = utf8_decoder()
        self.stops = StopFilter(p["stop"])
        self.token_ids = []
        self.finish_reason = None
        self.out = None  # the Output of the current step

    def live(self):
        """Decoding and still owing tokens (as far as the host has queued)."""
        return self.finish_reason is None and self.slot is not None and 0 < self.queued < self.p["max_new_tokens"]

    def output(self, outs):
        if self.out is None:
            self.out = Output(self.request, self.index, logprobs=[] if self.request.logprobs is not None else None)
            outs.append(self.out)
        return self.out

    def feed(self, token, logprob, outs):
        """One generated id (and its logprob entry or None); may finish the choice."""
        out = self.output(outs)
        self.token_ids.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
        if token == EOT_ID and not self.p["ignore_eos"]:
            return self.finish("eos", outs)
        text, hit = self.stops.push(self.decoder.decode(_token_bytes(token)))
        out.text += text
        if hit:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.p["max_new_tokens"]:
            self.finish("length", outs)

    def finish(self, reason, outs):
        """End the choice: flush the decoder and the held-back text (a stop string may still complete)."""
        out = self.output(outs)
        text, hit = self.stops.push(self.decoder.decode(b"", final=True))
        out.text += text if hit else text + self.stops.flush()
        self.finish_reason = "stop" if hit else reason


# ====================================================================== sampling (on device)

# Columns of the per-slot parameter table (S, len(COLS)), float32.
COLS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "greedy")
TEMP, TOPK, TOPP, MINP, REP, PRES, FREQ, GREEDY = range(len(COLS))


def param_row(p):
    """A choice's row of the parameter table; filters that are off get values that change nothing."""
    greedy = p["temperature"] < GREEDY_BELOW
    top_k = p["top_k"] if 1 <= p["top_k"] < N_VOCAB else N_VOCAB
    return [1.0 if greedy else p["temperature"], top_k, p["top_p"] if p["top_p"] < 1.0 else 2.0, p["min_p"],
            p["repetition_penalty"], p["presence_penalty"], p["frequency_penalty"], float(greedy)]


def sampler_kind(params_list, logprobs=False):
    """How a batch samples: (n_cand, penalize, logprobs), fixed for the batch (part of a CUDA graph's key).

    n_cand (see sample): 0 if every row is greedy; -1 if no sampled row has top-k / top-p;
    TOPK_CANDIDATES if every sampled row's top_k is within it; else N_VOCAB (full sort).
    penalize: some row has a penalty or a logit bias (otherwise those ops and their state are skipped).
    """
    penalize = any(p["repetition_penalty"] != 1.0 or p["presence_penalty"] or p["frequency_penalty"]
                   or p["logit_bias"] for p in params_list)
    sampled = [p for p in params_list if p["temperature"] >= GREEDY_BELOW]
    if not sampled:
        n_cand = 0
    elif all(p["top_k"] in (0, N_VOCAB) and p["top_p"] >= 1.0 for p in sampled):
        n_cand = -1
    elif all(1 <= p["top_k"] <= TOPK_CANDIDATES for p in sampled):
        n_cand = TOPK_CANDIDATES
    else:
        n_cand = N_VOCAB
    return n_cand, penalize, bool(logprobs)


def sample(logits, p, u, n_cand, penalties=None):
    """Pick the next id of every row, on the logits' device, without a host sync.

    logits (B, V') with V' >= N_VOCAB; p (B, len(COLS)) parameter rows; u (B, 1) uniforms in [0, 1);
    penalties: None or (bias, seen, counts), each (B, N_VOCAB): logit bias, tokens in the prompt or
    output (repetition penalty, CTRL-style: a positive logit is divided by it, a negative one
    multiplied), and how often each token was generated (presence / frequency penalties, OpenAI).
    n_cand (a Python int, so shapes stay fixed for CUDA graphs): 0 = every row greedy, argmax only;
    -1 = no top-k / top-p (no sort); k < N_VOCAB = the cut-off from torch.topk(k); N_VOCAB = from a
    full sort. Sampling is inverse-CDF over the kept tokens in vocabulary order (the first id whose
    cumulative probability passes u * total), so the id a given u picks never depends on the path.
    """
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


class _Fetch:
    """Device tensors on their way to the host; get() waits for them (the one sync of a chunk).

    On CUDA the copies to pinned memory are queued behind the work that makes them, so the host can
    queue more work before it reads these.
    """

    def __init__(self, tensors):
        if tensors and tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = [t.clone() for t in tensors], None

    def get(self):
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() for t in self.host]


def _call_model(model, idx, cache, pos, kv_len):
    """The decode forward as a function of the model, so a compiled copy holds no reference to it."""
    return model(idx, cache=cache, pos=pos, kv_len=kv_len)[0]


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled code, and its recompile limit, per
    code object, so each engine's compiled forward gets its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


def _device_dtype(model):
    """Device and compute dtype of a model (a quantized model keeps float embeddings)."""
    p = next(p for p in model.parameters() if p.is_floating_point())
    return p.device, p.dtype


# ====================================================================== engine


class Engine:
    """Continuous batching for one model: requests join between steps and leave when they finish.

    max_batch: cache slots (rows decoded together at most). prefill_chunk: prompt tokens prefilled
    per step at most. decode_chunk: decode steps per host sync (default 8 on CUDA, 1 elsewhere).
    graphs: capture decode steps in CUDA graphs (default: on CUDA). static: bucketed fixed shapes
    without graphs (default: = graphs; True on CPU runs the graph path's logic). compile:
    torch.compile the decode forward. pipeline: queue a chunk before reading the previous one
    (default: on CUDA). add / cancel / stats / has_work / embed are thread-safe; step is called
    by one thread.
    """

    def __init__(self, model, max_batch=64, prefill_chunk=512, decode_chunk=None, graphs=None, compile=False,
                 static=None, pipeline=None):
        self.model, self.config = model, model.config
        self.device, self.dtype = _device_dtype(model)
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else bool(graphs)
        if self.graphs and not cuda:
            raise ValueError("graphs=True (CUDA graphs) needs a model on a CUDA device")
        self.static = self.graphs or bool(static)
        self.pipeline = cuda if pipeline is None else bool(pipeline)
        self.compile = bool(compile)
        self._forward = torch.compile(_own_copy(_call_model)) if compile else _call_model
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.kmax = decode_chunk or (8 if cuda else 1)
        S, V, dev = max_batch, N_VOCAB, self.device
        self.cache = KVCache(self.config, S, device=dev, dtype=self.dtype)
        # decode state: every tensor allocated once, written in place (CUDA graphs read them)
        self.params = torch.tensor([param_row(DEFAULTS)] * S, device=dev)  # per-slot sampling parameters
        self.bias = torch.zeros(S, V, device=dev)
        self.seen = torch.zeros(S, V, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(S, V, device=dev)
        self.tok = torch.zeros(S, 1, dtype=torch.long, device=dev)  # next input id of each slot
        self.pos = torch.zeros(S, dtype=torch.long, device=dev)  # its cache position
        self.u = torch.zeros(S, self.kmax, device=dev)  # this chunk's uniforms
        self.j = torch.zeros(1, dtype=torch.long, device=dev)  # step within the chunk
        self.out = torch.zeros(S, self.kmax, dtype=torch.long, device=dev)  # sampled ids
        self.out_lp = torch.zeros(S, self.kmax, device=dev)  # their raw log-probabilities
        self.top_ids = torch.zeros(S, self.kmax, MAX_LOGPROBS, dtype=torch.long, device=dev)
        self.top_lp = torch.zeros(S, self.kmax, MAX_LOGPROBS, device=dev)
        self._graphs, self._pool = {}, None  # (B, L, kind) -> torch.cuda.CUDAGraph
        self.notes = []  # fallbacks taken
        # host state
        self._lock = threading.Lock()  # the device state: step, embed
        self._q_lock = threading.Lock()  # the waiting queue and counters
        self._waiting = []  # Requests not admitted yet, in order
        self._active = []  # admitted Requests: prefilling or decoding
        self._free = list(range(S))  # a heap of free slots: the lowest first keeps batches small
        self._rows = [None] * S  # slot -> _Choice
        self._inflight = []  # queued work whose results are not read yet (pipeline)

    def describe(self):
        return {"graphs": self.graphs, "static": self.static, "compile": self.compile, "decode_chunk": self.kmax,
                "pipeline": self.pipeline, "max_batch": self.max_batch, "prefill_chunk": self.prefill_chunk,
                "graphs_captured": len(self._graphs), "notes": list(self.notes)}

    # -------------------------------------------------------------- thread-safe API

    def add(self, prompt_ids, params=None, n=1, logprobs=None, echo=False, tag=None):
        """Queue a request -> its handle. params: validate_params output (None: defaults).
        Raises ParamError for a bad prompt, n, logprobs or a prompt + max_new_tokens over block_size."""
        params = validate_params() if params is None else params
        ids = check_request(prompt_ids, params, n, logprobs, echo, self.max_batch, self.config.block_size)
        req = Request(ids, params, n, logprobs, bool(echo), tag)
        with self._q_lock:
            self._waiting.append(req)
        return req

    def cancel(self, request):
        """End a request: its choices finish with "cancelled" at the next step."""
        request.cancelled = True

    def stats(self):
        with self._q_lock:
            return {"running": len(self._active), "waiting": len(self._waiting),
                    "slots_used": self.max_batch - len(self._free), "slots_total": self.max_batch}

    def has_work(self):
        with self._q_lock:
            return bool(self._waiting or self._active or self._inflight)

    @torch.no_grad()
    def embed(self, inputs):
        """Mean-pooled final hidden states of each id list, L2-normalised -> list of lists of floats."""
        for ids in inputs:
            check_ids(ids, "input")
            if len(ids) > self.config.block_size:
                raise ParamError("input", f"input is {len(ids)} tokens; this model reads at most "
                                          f"{self.config.block_size}")
        out = []
        with self._lock, sdpa_kernel(ATTENTION):
            for ids in inputs:
                h = self.model.hidden(torch.tensor([ids], device=self.device))[0].float()  # (T, C)
                out.append(F.normalize(h.mean(dim=0), dim=0).tolist())
        return out

    # -------------------------------------------------------------- the loop

    @torch.no_grad()
    def step(self):
        """Prefill up to prefill_chunk prompt tokens, decode one chunk for every running row, and
        return the Outputs of what finished computing ([] when idle)."""
        with self._lock:
            outs = []
            self._cancel_requested(outs)
            prefill, decode = self._prefill(outs), self._decode()
            # pipelined: this decode chunk is read next step (the device works meanwhile); first tokens now
            done = self._inflight + [prefill] + ([] if self.pipeline else [decode])
            self._inflight = [decode] if self.pipeline and decode else []
            for kind, *args in filter(None, done):
                (self._read_prefill if kind == "prefill" else self._read_decode)(*args, outs)
            self._release(outs)
            for o in outs:
                o.request.choices[o.index].out = None
                if o.finish_reason is not None:
                    o.usage = {"prompt_tokens": len(o.request.prompt),
                               "completion_tokens": len(o.request.choices[o.index].token_ids)}
            return outs

    def _cancel_requested(self, outs):
        with self._q_lock:
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = [r for r in self._waiting if not r.cancelled]
        for r in gone + [r for r in self._active if r.cancelled]:
            for c in r.choices:
                if c.finish_reason is None:
                    c.finish("cancelled", outs)

    def _release(self, outs):
        """Free the slots of choices that finished; drop finished requests; fill in finish reasons."""
        for o in outs:
            c = o.request.choices[o.index]
            o.finish_reason = c.finish_reason
            if c.finish_reason is not None and c.slot is not None:
                self._rows[c.slot] = None
                heapq.heappush(self._free, c.slot)
                c.slot = None
        with self._q_lock:
            self._active = [r for r in self._active if not r.done]

    def _admit(self):
        """The next waiting request, given slots for its choices, or None (none waiting, or not enough free slots)."""
        with self._q_lock:
            if not self._waiting or len(self._free) < self._waiting[0].n:
                return None
            r = self._waiting.pop(0)
            self._active.append(r)
            slots = [heapq.heappop(self._free) for _ in range(r.n)]
        for c, s in zip(r.choices, slots):
            c.slot = s
            self._rows[s] = c
        idx = self._upload(slots, torch.long)
        self.params.index_copy_(0, idx, self._upload([param_row(r.params)] * r.n, torch.float32))
        self.bias.index_fill_(0, idx, 0)
        if r.params["logit_bias"]:
            toks = self._upload(list(r.params["logit_bias"]), torch.long)
            vals = self._upload(list(r.params["logit_bias"].values()), torch.float32)
            for s in slots:
                self.bias[s, toks] = vals
        return r

    def _upload(self, values, dtype):
        """A host list -> a device tensor, without waiting for queued work (pinned, async on CUDA)."""
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    # -------------------------------------------------------------- prefill

    def _prefill(self, outs):
        """Queue one batched forward over the next prompt chunks, at most prefill_chunk tokens padding
        included: prompts already prefilling first, then newly admitted ones. Prompts completed by it
        sample their first tokens. Returns the work to read, or None."""
        rows, width, budget, block = [], 0, self.prefill_chunk, self.config.block_size
        pending = [r for r in self._active if r.filled < len(r.prompt) and not r.done]
        while not rows or (len(rows) + 1) * width <= budget:
            r = pending.pop(0) if pending else self._admit()
            if r is None:
                break
            start = r.filled
            n = min(len(r.prompt) - start, budget // (len(rows) + 1))
            w = max(width, n)
            if n == 0 or max([s for _, s, _ in rows] + [start]) + w > block:
                break  # padding would run past the cache: it prefills next step (an admitted one stays active)
            rows.append((r, start, n))
            width = w
        if not rows:
            return None
        # right padding writes past each prompt's end, where nothing is read before it is overwritten
        idx = self._upload([r.prompt[s:s + n] + [EOT_ID] * (width - n) for r, s, n in rows], torch.long)  # (B, T)
        starts = [s for _, s, _ in rows]
        pos = self._upload(starts, torch.long)
        slots = self._upload([r.choices[0].slot for r, _, _ in rows], torch.long)
        with sdpa_kernel(ATTENTION):
            h = self.model.hidden(idx, cache=self.cache, pos=pos, slots=slots, kv_len=max(starts) + width)  # (B, T, C)
        # idle slots decode at the prefilled length, so their garbage lands past it
        self.pos.index_copy_(0, slots, self._upload([min(s + n, block - 1) for _, s, n in rows], torch.long))
        finals = []
        for b, (r, s, n) in enumerate(rows):
            r.filled = s + n
            m = min(n, len(r.prompt) - s - 1)  # positions predicting a prompt token
            if r.echo and m > 0:
                targets = self._upload(r.prompt[s + 1:s + 1 + m], torch.long)
                r.prompt_lp.append(_logprobs(self.model.lm_head(h[b, :m]), targets))
            if r.filled == len(r.prompt):
                finals.append((b, r, n - 1))
        return self._first_tokens(h, finals) if finals else None

    def _first_tokens(self, h, finals):
        """Fork each completed prompt into its choices' slots and sample their first tokens."""
        choices, at = [], []
        for b, r, last in finals:
            for c in r.choices[1:]:
                self.cache.copy_slot(r.choices[0].slot, c.slot)
            for c in r.choices:
                c.pos = len(r.prompt)
                if r.params["max_new_tokens"] > 0 and c.finish_reason is None:
                    c.queued = 1
                    choices.append(c)
                    at.append((b, last))
        fetch = []
        for _, r, _ in finals:
            if sampler_kind([r.params])[1]:  # now, not at admission: idle rows of decode steps scribble on these
                slots = self._upload([c.slot for c in r.choices], torch.long)
                self.seen.index_fill_(0, slots, False)
                self.counts.index_fill_(0, slots, 0)
                self.seen[slots.view(-1, 1), self._upload(r.prompt, torch.long)] = True
            if r.echo and r.prompt_lp:
                fetch += [torch.cat(parts) for parts in zip(*r.prompt_lp)]
        if choices:
            b_idx, t_idx = (self._upload(list(x), torch.long) for x in zip(*at))
            logits = self.model.lm_head(h[b_idx, t_idx])  # (R, V')
            slots = self._upload([c.slot for c in choices], torch.long)
            kind = sampler_kind([c.p for c in choices], any(c.request.logprobs is not None for c in choices))
            u = self._upload([[0.0 if c.greedy else c.rng.random()] for c in choices], torch.float32)
            pen = (self.bias[slots], self.seen[slots], self.counts[slots]) if kind[1] else None
            nxt = sample(logits, self.params[slots], u, kind[0], pen)
            if kind[1]:
                self.seen[slots, nxt] = True
                self.counts.index_put_((slots, nxt), torch.ones_like(nxt, dtype=torch.float32), accumulate=True)
            self.tok.index_copy_(0, slots, nxt.view(-1, 1))
            self.pos.index_copy_(0, slots, self._upload([c.pos for c in choices], torch.long))
            fetch += [nxt] + (list(_logprobs(logits, nxt)) if kind[2] else [])
        return "prefill", finals, choices, _Fetch(fetch)

    def _read_prefill(self, finals, choices, fetch, outs):
        values = fetch.get()
        for _, r, _ in finals:
            if r.echo and r.prompt_lp:
                lp, ids, top = values[:3]
                values = values[3:]
                entries = [None] + [_entry(t, *x, r.logprobs) for t, x in zip(r.prompt[1:], zip(lp, ids, top))]
            elif r.echo:
                entries = [None]
            for c in r.choices:
                if r.echo and c.finish_reason is None:
                    c.output(outs).prompt_logprobs = entries
        if choices:
            nxt, *lps = values
            for i, c in enumerate(choices):
                if c.finish_reason is None:
                    c.feed(nxt[i], _entry(nxt[i], *(x[i] for x in lps), c.request.logprobs) if lps else None, outs)
        for _, r, _ in finals:
            for c in r.choices:
                if r.params["max_new_tokens"] == 0 and c.finish_reason is None:
                    c.finish("length", outs)

    # -------------------------------------------------------------- decode

    def _decode(self):
        """Queue K decode steps for every running row (one host upload of uniforms, no sync)."""
        live = [c for c in self._rows if c is not None and c.live()]
        if not live:
            return None
        B = max(c.slot for c in live) + 1
        K = min(self.kmax, max(c.p["max_new_tokens"] - c.queued for c in live))
        L = max(c.pos for c in live) + K  # the steps write positions pos .. pos + K - 1
        if self.static:
            B = min(self.max_batch, 1 << (B - 1).bit_length())
            L = -(-L // CACHE_BUCKET) * CACHE_BUCKET
        L = min(L, self.config.block_size)
        kind = sampler_kind([c.p for c in live], any(c.request.logprobs is not None for c in live))
        rows = [c if c is not None and c.live() else None for c in self._rows[:B]]
        if kind[0] != 0:
            zeros = [0.0] * self.kmax
            u = [[c.rng.random() for _ in range(K)] + zeros[K:] if c is not None and not c.greedy else zeros
                 for c in rows]
            self.u[:B].copy_(self._upload(u, torch.float32))
        self.j.zero_()
        for _ in range(K):
            self._run_step(B, L, kind)
        for c in live:
            c.queued += K
            c.pos += K
        logprobs = [self.out_lp[:B], self.top_ids[:B], self.top_lp[:B]] if kind[2] else []
        return "decode", rows, K, _Fetch([self.out[:B]] + logprobs)

    def _read_decode(self, rows, K, fetch, outs):
        ids, *lps = fetch.get()
        for b, c in enumerate(rows):
            for k in range(K):
                if c is None or c.finish_reason is not None:
                    break
                lp = _entry(ids[b][k], *(x[b][k] for x in lps), c.request.logprobs) if lps else None
                c.feed(ids[b][k], lp, outs)

    def _decode_step(self, B, L, kind):
        """One decode step of slots 0..B-1 reading L cache positions: the unit captured in a CUDA
        graph. No host sync; every result lands in the engine's tensors."""
        n_cand, penalize, logprobs = kind
        logits = self._forward(self.model, self.tok[:B], self.cache, self.pos[:B], L)[:, -1]  # (B, V')
        u = self.u[:B].index_select(1, self.j)  # (B, 1) this step's uniforms
        pen = (self.bias[:B], self.seen[:B], self.counts[:B]) if penalize else None
        nxt = sample(logits, self.params[:B], u, n_cand, pen).view(B, 1)
        if penalize:
            self.seen[:B].scatter_(1, nxt, True)
            self.counts[:B].scatter_add_(1, nxt, torch.ones_like(nxt, dtype=torch.float32))
        if logprobs:
            lp, top_ids, top_lp = _logprobs(logits, nxt)
            self.out_lp[:B].index_copy_(1, self.j, lp.view(B, 1))
            self.top_ids[:B].index_copy_(1, self.j, top_ids.unsqueeze(1))
            self.top_lp[:B].index_copy_(1, self.j, top_lp.unsqueeze(1))
        self.out[:B].index_copy_(1, self.j, nxt)
        self.tok[:B].copy_(nxt)
        self.pos[:B].add_(1).clamp_(max=self.config.block_size - 1)  # idle rows drift; stay inside the cache
        self.j.add_(1)

    def _run_step(self, B, L, kind):
        graph = self._graph(B, L, kind) if self.graphs else None
        if graph is not None:
            return graph.replay()
        self._decode_step(B, L, kind)

    def _graph(self, B, L, kind):
        """The CUDA graph of a decode step, captured on first use; None (and graphs off) if capture fails."""
        graph = self._graphs.get((B, L, kind))
        if graph is None and self.graphs:
            try:
                graph = self._graphs[(B, L, kind)] = self._capture(B, L, kind)
            except Exception as e:  # keep serving: decode uncaptured, loudly
                self.notes.append(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs")
                warnings.warn(self.notes[-1], RuntimeWarning, stacklevel=3)
                self.graphs = False
        return graph

    def warmup(self, kinds=((0, False, False), (TOPK_CANDIDATES, False, False))):
        """Capture (and compile) the decode steps of every batch and cache-length bucket for these sampler
        kinds (default: greedy, and top-k / top-p sampling without penalties) before serving, so no
        request waits for a capture; others are captured on first use. -> graphs held (0 without graphs)."""
        block = self.config.block_size
        with self._lock, torch.no_grad():
            for B in sorted({min(self.max_batch, 1 << i) for i in range(self.max_batch.bit_length() + 1)}):
                for L in sorted({min(block, L) for L in range(CACHE_BUCKET, block + CACHE_BUCKET, CACHE_BUCKET)}):
                    for kind in kinds:
                        self._graph(B, L, kind)
        return len(self._graphs)

    def _capture(self, B, L, kind):
        """Warm up (compiles if asked) on a side stream, then record one decode step in a graph.

        The warm-up steps really run: the state they change is saved and put back. Their cache
        writes land at or past each slot's filled length, which is rewritten before it is read.
        """
        saved = [(t, t.clone()) for t in (self.tok, self.pos, self.j, self.seen, self.counts)]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.j.zero_()  # stay inside u / out even when decode_chunk is 1
                self._decode_step(B, L, kind)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for t, copy in saved:
            t.copy_(copy)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._decode_step(B, L, kind)
        return graph


def _logprobs(logits, ids):
    """Raw log-probabilities (before any sampling parameter) of ids (R,) under logits (R, V') ->
    (logprob (R,), top ids (R, MAX_LOGPROBS), their logprobs)."""
    raw = torch.log_softmax(logits[:, :N_VOCAB].float(), dim=-1)
    top = raw.topk(MAX_LOGPROBS, dim=-1)
    return raw.gather(1, ids.view(-1, 1)).view(-1), top.indices, top.values


def _entry(token, logprob, top_ids, top_lps, k):
    return {"token_id": token, "logprob": logprob, "top": list(zip(top_ids[:k or 0], top_lps[:k or 0]))}


# ====================================================================== generation helpers


def _requests(engine, prompts, params):
    """Validate everything up front (any bad value raises before work starts), then add."""
    p = validate_params(**params)
    ids = [encode_prompt(prompt, p["raw"]) for prompt in prompts]
    for x in ids:
        check_fits(len(x), p["max_new_tokens"], engine.config.block_size)
    return [engine.add(x, p) for x in ids]


def _outputs(engine, requests):
    """Step the engine until the requests are done; yields their Outputs."""
    while not all(r.done for r in requests):
        yield from (o for o in engine.step() if any(o.request is r for r in requests))


def _engine(model, rows):
    """model itself if it is an Engine nobody else steps; else a fresh Engine with `rows` slots."""
    return model if isinstance(model, Engine) else Engine(model, max_batch=max(1, rows))


def generate_batch(model, prompts, **params):
    """Generate for a list of prompts together (an Engine or a model) -> one result dict per prompt.

    result: {"text", "finish_reason": "eos"|"stop"|"length"|"cancelled", "prompt_tokens",
    "completion_tokens", "token_ids"}. completion_tokens counts every generated token, including a
    final <|endoftext|> and the token that completed a stop string; text excludes both.
    """
    engine = _engine(model, len(prompts))
    requests = _requests(engine, prompts, params)
    results = [{"text": "", "token_ids": []} for _ in requests]
    for o in _outputs(engine, requests):
        res = results[requests.index(o.request)]
        res["text"] += o.text
        res["token_ids"] += o.token_ids
        if o.finish_reason is not None:
            res.update(finish_reason=o.finish_reason, **o.usage)
    return results


def generate_text(model, prompt, **params):
    """Generate a completion for one prompt; parameters as validate_params. See generate_batch."""
    return generate_batch(model, [prompt], **params)[0]


def stream_text(model, prompt, **params):
    """An iterator of the generated text in pieces: never a broken UTF-8 character, never any part
    of a stop string. Parameters as generate_text; they are checked at the call (ParamError)."""
    engine = _engine(model, 1)
    requests = _requests(engine, [prompt], params)
    return (o.text for o in _outputs(engine, requests) if o.text)


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


def load_model_from_checkpoint(path, device=None, dtype=None, quantize=None):
    """checkpoint.load_model, then ready for generation (prepare_model) -> (model, info).

    device: None/"auto" = CUDA > MPS > CPU. dtype: None/"auto" = bf16 on CUDA, fp32 elsewhere.
    quantize: None or "int8" (CPU, fp32: dynamic int8 Linears). On CPU the Linears take the
    (in, out) layout (InOutLinear): the model is for inference only. Bad input raises
    common.UserError with a one-line message.
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
    model, info = load_model(path)
    info.update(device=str(device), dtype=str(dtype).replace("torch.", ""), quantize=quantize,
                n_params=model.num_params(), instruction_tuned=info["kind"] == "sft")
    return prepare_model(model, device, dtype, quantize), info


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
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty"):
        kind = int if PARAM_RANGES[name]["type"] == "int" else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=DEFAULTS[name], help=_flag_help(name))
    p.add_argument("--stop", action="append", default=None,
                   help=f"stop string; repeat for several (at most {MAX_STOP_STRINGS}); not included in the output")
    p.add_argument("--seed", type=int, default=None, help=_flag_help("seed"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic int8 Linears (CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: torch's choice)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for the decode steps (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (slow first call, faster decoding)")
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                  stop=args.stop, seed=args.seed, raw=args.raw)
    try:
        validate_params(**params)  # fail fast, before loading the model
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, info = load_model_from_checkpoint(args.ckpt, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        engine = Engine(model, max_batch=1, graphs=args.graphs, compile=args.compile)
        t0 = time.perf_counter()
        request = _requests(engine, [prompt], params)[0]
        first, text, usage, reason = None, "", None, None
        for o in _outputs(engine, [request]):
            first = first or time.perf_counter()
            text += o.text
            if args.stream and o.text:
                print(o.text, end="", flush=True)
            usage, reason = o.usage or usage, o.finish_reason or reason
    except ValueError as e:
        raise UserError(str(e)) from None
    print("" if args.stream else text)
    if args.verbose:
        end = time.perf_counter()
        rate = (usage["completion_tokens"] - 1) / (end - first) if usage["completion_tokens"] > 1 else 0.0
        print(f"[{info['name']} on {info['device']} {info['dtype']}: finish_reason={reason} "
              f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} "
              f"prefill {(first - t0) * 1e3:.0f} ms, decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
