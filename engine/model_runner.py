"""The model runner: the device side of the engine. It owns the KV-cache and every decode tensor, runs
the forwards and samples on the device; results come back through one Fetch per piece of work.
Shapes: S slots, B rows of a decode batch (slots 0..B-1), K steps per chunk, V vocab, L cache positions read.
"""

import itertools
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from device import upload
from engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from engine.prefix_cache import PrefixCache, pool_blocks
from engine.sampler import logprobs, param_row, sample, sampler_kind
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from grammar import apply_bitmask, fill_bitmask, new_bitmask
from model import KVCache, flash_varlen, pack
from tokenizer import EOT_ID, N_VOCAB

CACHE_BUCKET = 128  # static / graph decode reads a multiple of this many cache positions
# Prefill and embed attention: not cuDNN, torch's first choice on Hopper, which builds a plan for every new
# shape (about 70 ms on an H200) and so would delay the first token of each new prompt width by that much.
# Decode keeps it: its shapes are bucketed and captured up front, and there it is faster (H200, graphs,
# batch 64: 68.7k against 54.2k decode tokens/s without it).
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FORWARD = "forward"  # the decode-step kind of a constrained batch's forward alone (its sampling follows)


class Fetch:
    """Device tensors on their way to the host; get() waits for them (the one sync of a chunk). On CUDA the
    copies to pinned memory queue behind the work that makes them, so the host can queue more meanwhile.
    The first `bulk` come back as numpy arrays (bulk values, echo columns and embeddings: no Python object
    per value), the rest as lists."""

    def __init__(self, tensors, bulk=0):
        if tensors and tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = [t.clone() for t in tensors], None
        self.bulk, self.values = bulk, None

    def get(self):
        if self.values is None:
            if self.event is not None:
                self.event.synchronize()
            self.values = [t.numpy() if i < self.bulk else t.tolist() for i, t in enumerate(self.host)]
        return self.values


@dataclass
class PrefillWork:
    finals: list  # the requests whose prompts this prefill completed
    choices: list  # the choices whose first token was sampled
    fetch: Fetch  # the finals' echo logprobs (three tensors, one after another), then the first ids (and logprobs)
    first: int  # where the first ids sit in the fetch
    spans: list  # per final: its echo rows (start, end) in the fetch, or None


@dataclass
class DecodeWork:
    rows: list  # slot -> Choice decoding in this chunk, or None
    steps: int  # K
    kind: tuple  # the sampler kind
    fetch: Fetch = None  # sampled ids (B, K) (and their logprobs); a constrained batch's: after sample_masked


def _call_model(model, idx, cache, pos, kv_len):
    """The decode forward as a function of the model, so a compiled copy holds no reference to it."""
    return model(idx, cache=cache, pos=pos, kv_len=kv_len)[0]


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled code, and its recompile limit, per
    code object, so each engine's compiled forward gets its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


def grammar_masks(rows, bitmask):
    """bitmask[b] <- the tokens the grammar of choice rows[b] allows next; all ones for a row without one
    -> bitmask. In llguidance's threads, without the GIL: the device runs on meanwhile."""
    bitmask.numpy().fill(-1)  # numpy: a torch op would wake torch's CPU thread pool
    pairs = [(c.matcher, b) for b, c in enumerate(rows) if c is not None and c.matcher is not None
             and c.finish_reason is None]
    if pairs:
        fill_bitmask([m for m, _ in pairs], bitmask, [b for _, b in pairs])
    return bitmask


def advance_matchers(works):
    """Each constrained choice's matcher takes its new token from these works (read now, before the text)."""
    for w in works:
        ids = w.fetch.get()
        if isinstance(w, PrefillWork):
            pairs = zip(w.choices, ids[w.first]) if w.choices else ()
        else:  # a constrained batch decodes one step: its tokens are column 0
            pairs = ((c, row[0]) for c, row in zip(w.rows, ids[0])) if w.kind[3] else ()
        for c, token in pairs:
            if c is not None and c.matcher is not None:
                c.advance(token)


class ModelRunner:
    """See Engine for the options. Every decode tensor is allocated once, written in place (graphs read them)."""

    def __init__(self, model, max_batch, decode_chunk=None, graphs=None, compile=False, static=None,
                 prefix_mb=None):
        self.model, self.config = model, model.config
        p = next(p for p in model.parameters() if p.is_floating_point())  # a quantized model keeps float embeddings
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        self.forward = torch.compile(_own_copy(_call_model)) if compile else _call_model
        self.max_batch, self.kmax = max_batch, decode_chunk or (8 if cuda else 1)
        S, V, dev = max_batch, N_VOCAB, self.device
        captured = (cuda if graphs is None else bool(graphs)) and flash_varlen(dev, self.dtype)
        self.cache = KVCache(self.config, S + captured, device=dev, dtype=self.dtype)  # + the prefill graphs' spare
        self.params = torch.tensor([param_row(SamplingParams())] * S, device=dev)  # per-slot sampling parameters
        self.bias = torch.zeros(S, V, device=dev)
        self.seen = torch.zeros(S, V, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(S, V, device=dev)
        self.tok = torch.zeros(S, 1, dtype=torch.long, device=dev)  # next input id of each slot
        self.pos = torch.zeros(S, dtype=torch.long, device=dev)  # its cache position
        self.u = torch.zeros(S, self.kmax, device=dev)  # this chunk's uniforms
        self.j = torch.zeros(1, dtype=torch.long, device=dev)  # step within the chunk
        self.out = torch.zeros(S, self.kmax, dtype=torch.long, device=dev)  # sampled ids
        lp_dtype = torch.promote_types(self.dtype, torch.float32)  # logprobs as sample's logits: float64 stays
        self.out_lp = torch.zeros(S, self.kmax, device=dev, dtype=lp_dtype)  # their raw log-probabilities
        self.top_ids = torch.zeros(S, self.kmax, MAX_LOGPROBS, dtype=torch.long, device=dev)
        self.top_lp = torch.zeros(S, self.kmax, MAX_LOGPROBS, device=dev, dtype=lp_dtype)
        # constrained batches: the forward's logits, sampled under the grammars' bitmask (all ones: no grammar)
        self.logits = torch.zeros(S, self.config.vocab_size, dtype=self.dtype, device=dev)
        self.mask = new_bitmask(S).fill_(-1).to(dev)
        self.host_mask = new_bitmask(S, pin=cuda)  # filled on the CPU while the forward runs
        self.filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self.graphs = DecodeGraphs(self, cuda if graphs is None else bool(graphs))
        self.prefill_graphs = PrefillGraphs(self, spare=S) if captured else None  # padding needs FlashAttention
        self.static = self.graphs.enabled or bool(static)
        self.prefix = PrefixCache(self.config, pool_blocks(self.config, S, self.dtype, prefix_mb), dev, self.dtype)

    def upload(self, values, dtype):
        return upload(values, dtype, self.device)

    def load(self, admitted):
        """Admitted requests' cached prefixes (r.match) into their first slots, their parameters into their
        slots: a few copies for all of them, not a few per request."""
        firsts = [r.choices[0].slot for r in admitted]
        for r, entries in zip(admitted, self.prefix.load([r.match for r in admitted], self.cache, firsts)):
            r.prompt_lp = [entries] if entries is not None else []
        choices = [c for r in admitted for c in r.choices]
        idx, first, filled = self.upload([c.slot for c in choices] + firsts + [r.filled for r in admitted],
                                         torch.long).split([len(choices), len(firsts), len(firsts)])
        self.pos.index_copy_(0, first, filled)  # idle decode rows write past the prefix
        self.params.index_copy_(0, idx, self.upload([param_row(c.p) for c in choices], torch.float32))
        self.bias.index_fill_(0, idx, 0)
        biased = [(c.slot, t, v) for c in choices for t, v in (c.p.logit_bias or {}).items()]
        if biased:
            slots, toks, vals = zip(*biased)
            self.bias.index_put_((self.upload(slots, torch.long), self.upload(toks, torch.long)),
                                 self.upload(vals, torch.float32))

    def prefill(self, rows):
        """Queue one forward over the prompt chunks [(request, start, n)], packed without padding; prompts
        completed sample their first tokens -> PrefillWork, or None."""
        if not rows:
            return None
        h, ends = prefill_forward(self, rows)  # (N, C), each row's last token among the N
        done = [(end, r) for end, (r, _, _) in zip(ends, rows) if r.filled == len(r.prompt)]
        if not done:
            return None
        return self._first_tokens(h.index_select(0, self.upload([end for end, _ in done], torch.long)),
                                  [r for _, r in done])

    def _first_tokens(self, last, finals):
        """Fork each completed prompt (last: its final hidden state, (len(finals), C)) into its choices' slots
        and sample their first tokens."""
        choices, at = [], []
        for i, r in enumerate(finals):
            for c in r.choices[1:]:
                self.cache.copy_slot(r.choices[0].slot, c.slot)
            for c in r.choices:
                c.pos = len(r.prompt)
                if r.params.max_new_tokens > 0 and c.finish_reason is None:
                    c.queued = 1
                    choices.append(c)
                    at.append(i)
            if sampler_kind([r.params])[1]:  # now, not at admission: idle rows of decode steps scribble on these
                slots = self.upload([c.slot for c in r.choices], torch.long)
                self.seen.index_fill_(0, slots, False)
                self.counts.index_fill_(0, slots, 0)
                seen = (slots.view(-1, 1), self.upload(r.prompt, torch.long))
                self.seen.index_put_(seen, self.upload(True, torch.bool))  # not seen[...] = True: that waits (a sync)
        fetch, spans = keep_prompts(self, finals)
        first = len(fetch)
        if choices:
            logits = self.model.lm_head(last[self.upload(at, torch.long)])  # (R, V')
            slots = self.upload([c.slot for c in choices], torch.long)
            kind = sampler_kind([c.p for c in choices], any(c.request.logprobs is not None for c in choices))
            u = self.upload([[0.0 if c.p.greedy else c.rng.random()] for c in choices], torch.float32)
            pen = (self.bias[slots], self.seen[slots], self.counts[slots]) if kind[1] else None
            mask = grammar_masks(choices, new_bitmask(len(choices), pin=slots.is_cuda)) if kind[3] else None
            masked = apply_bitmask(logits, mask.to(self.device, non_blocking=True)) if kind[3] else logits
            nxt = sample(masked, self.params[slots], u, kind[0], pen)
            if kind[1]:
                self.seen.index_put_((slots, nxt), torch.ones_like(nxt, dtype=torch.bool))
                self.counts.index_put_((slots, nxt), torch.ones_like(nxt, dtype=torch.float32), accumulate=True)
            self.tok.index_copy_(0, slots, nxt.view(-1, 1))
            self.pos.index_copy_(0, slots, self.upload([c.pos for c in choices], torch.long))
            fetch += [nxt] + (list(logprobs(logits, nxt)) if kind[2] else [])
        return PrefillWork(finals, choices, Fetch(fetch, bulk=first), first, spans)

    def decode(self, rows_by_slot, live):
        """Queue K decode steps for every live choice (no sync) -> DecodeWork or None. A constrained batch
        queues one step's forward alone: sample_masked follows (a mask needs the last token)."""
        if not live:
            return None
        kind = sampler_kind([c.p for c in live], any(c.request.logprobs is not None for c in live))
        B = max(c.slot for c in live) + 1
        K = 1 if kind[3] else min(self.kmax, max(c.p.max_new_tokens - c.queued for c in live))
        L = max(c.pos for c in live) + K  # the steps write positions pos .. pos + K - 1
        if self.static:
            B = min(self.max_batch, 1 << (B - 1).bit_length())
            L = -(-L // CACHE_BUCKET) * CACHE_BUCKET
        L = min(L, self.config.block_size)
        rows = [c if c is not None and c.live() else None for c in rows_by_slot[:B]]
        if kind[0] != 0:
            zeros = [0.0] * self.kmax
            u = [[c.rng.random() for _ in range(K)] + zeros[K:] if c is not None and not c.p.greedy else zeros
                 for c in rows]
            self.u[:B].copy_(self.upload(u, torch.float32))
        self.j.zero_()
        for _ in range(K):
            self._step(B, L, FORWARD if kind[3] else kind)
        for c in live:
            c.queued += K
            c.pos += K
        work = DecodeWork(rows, K, kind)
        if not kind[3]:
            work.fetch = self._fetch(B, kind)
        return work

    def fill_masks(self, work, earlier):
        """Start the masks of a constrained step -> a Future of the bitmask: each matcher takes its last token
        from the earlier works, then a thread fills the masks while the host makes the text. The host waits
        until that thread runs: it needs the GIL to start, and the text making that follows is pure Python,
        which holds the GIL until it blocks, so the masks would be computed after the text, not beside it."""
        advance_matchers(earlier)
        started, bitmask = threading.Event(), self.host_mask[:len(work.rows)]

        def fill():
            started.set()
            return grammar_masks(work.rows, bitmask)  # llguidance's part runs without the GIL

        masks = self.filler.submit(fill)
        started.wait()
        return masks

    def sample_masked(self, work, bitmask):
        """Sample a constrained step under its masks -> work.fetch."""
        B = len(work.rows)
        self.mask[:B].copy_(bitmask, non_blocking=True)
        self._step(B, 0, work.kind)
        work.fetch = self._fetch(B, work.kind)

    def _step(self, B, L, kind):
        graph = self.graphs.get(B, L, kind)
        if graph is None:
            self.decode_step(B, L, kind)
        else:
            graph.replay()

    def _fetch(self, B, kind):
        return Fetch([self.out[:B]] + ([self.out_lp[:B], self.top_ids[:B], self.top_lp[:B]] if kind[2] else []))

    def decode_step(self, B, L, kind):
        """One decode step of slots 0..B-1 reading L cache positions: the unit of a CUDA graph, no host sync.
        A constrained batch runs it in two halves: kind FORWARD keeps the logits, then the masked sampler
        kind samples them under self.mask."""
        if kind == FORWARD:
            self.logits[:B].copy_(self.forward(self.model, self.tok[:B], self.cache, self.pos[:B], L)[:, -1])
            return
        n_cand, penalize, want_logprobs, masked = kind
        if masked:
            logits = self.logits[:B]  # raw (logprobs read these); sampled under the mask
        else:
            logits = self.forward(self.model, self.tok[:B], self.cache, self.pos[:B], L)[:, -1]  # (B, V')
        u = self.u[:B].index_select(1, self.j)  # (B, 1) this step's uniforms
        pen = (self.bias[:B], self.seen[:B], self.counts[:B]) if penalize else None
        nxt = sample(apply_bitmask(logits, self.mask[:B]) if masked else logits, self.params[:B], u, n_cand,
                     pen).view(B, 1)
        if penalize:
            self.seen[:B].scatter_(1, nxt, True)
            self.counts[:B].scatter_add_(1, nxt, torch.ones_like(nxt, dtype=torch.float32))
        if want_logprobs:
            lp, top_ids, top_lp = logprobs(logits, nxt)
            self.out_lp[:B].index_copy_(1, self.j, lp.view(B, 1))
            self.top_ids[:B].index_copy_(1, self.j, top_ids.unsqueeze(1))
            self.top_lp[:B].index_copy_(1, self.j, top_lp.unsqueeze(1))
        self.out[:B].index_copy_(1, self.j, nxt)
        self.tok[:B].copy_(nxt)
        self.pos[:B].add_(1).clamp_(max=self.config.block_size - 1)  # idle rows drift; stay inside the cache
        self.j.add_(1)


def prefill_forward(runner, rows):
    """Queue one forward over rows [(request, start, n)], packed into one sequence (model.Packed; replayed from
    a CUDA graph where one applies) -> (hidden states (N, C), the index of each row's last token among the N);
    echo rows keep their prompt's logprob entries."""
    block = runner.config.block_size
    chunks = [(r.prompt[s:s + n], r.choices[0].slot, s) for r, s, n in rows]
    h = runner.prefill_graphs.run(chunks) if runner.prefill_graphs else None
    if h is None:
        idx, packed = pack(chunks, block, runner.upload)
        with sdpa_kernel(ATTENTION):
            h = runner.model.hidden(idx, cache=runner.cache, packed=packed)[0]  # (N, C)
    starts = list(itertools.accumulate((n for *_, n in rows), initial=0))  # each row's first token among the N
    # idle slots decode at the prefilled length, so their garbage lands past it
    slots = runner.upload([r.choices[0].slot for r, _, _ in rows], torch.long)
    runner.pos.index_copy_(0, slots, runner.upload([min(s + n, block - 1) for _, s, n in rows], torch.long))
    echo = []  # (request, its first token among the N, m, the m prompt tokens its first m positions predict)
    for (r, s, n), start in zip(rows, starts):
        r.filled = s + n
        m = min(n, len(r.prompt) - s - 1)
        if r.echo and m > 0:
            echo.append((r, start, m, r.prompt[s + 1:s + 1 + m]))
    if echo:  # one lm_head and one log_softmax over the echo rows' positions, not a few ops per row
        at = runner.upload([start + t for _, start, m, _ in echo for t in range(m)], torch.long)
        targets = runner.upload([t for *_, ids in echo for t in ids], torch.long)
        entries = logprobs(runner.model.lm_head(h.index_select(0, at)), targets)
        for (r, *_), *parts in zip(echo, *(t.split([m for _, _, m, _ in echo]) for t in entries)):
            r.prompt_lp.append(tuple(parts))
    return h, [end - 1 for end in starts[1:]]


def keep_prompts(runner, finals):
    """Completed prompts' full blocks into the prefix cache, and the echo requests' entries into one fetch
    (as many top columns as the most any asks for) -> (tensors to fetch, per final its rows among them,
    (start, end), or None)."""
    echo = [r for r in finals if r.echo and r.prompt_lp]
    entries = [torch.cat(parts) for parts in zip(*(chunk for r in echo for chunk in r.prompt_lp))] if echo else None
    prompts, spans, at = [], [], 0
    for r in finals:
        span = (at, at + len(r.prompt) - 1) if r.echo and r.prompt_lp else None  # a row per token after the first
        at = span[1] if span else at
        prompts.append((r.prompt, r.choices[0].slot, span and span[0]))
        spans.append(span)
    runner.prefix.store(prompts, runner.cache, entries)
    k = max((r.logprobs or 0 for r in echo), default=0)
    return ([entries[0]] + [t[:, :k] for t in entries[1:]] if echo else []), spans


def embed_forward(runner, inputs):
    """Queue one padded forward over id lists -> Fetch of their mean-pooled final hidden states, L2-normalised
    (B, C). Causal attention: the padding after a row changes nothing before it."""
    width = max(map(len, inputs))
    idx = runner.upload([ids + [EOT_ID] * (width - len(ids)) for ids in inputs], torch.long)  # (B, W)
    with sdpa_kernel(ATTENTION):
        h = runner.model.hidden(idx).float()  # (B, W, C)
    return Fetch([F.normalize(torch.stack([h[b, :len(ids)].mean(dim=0) for b, ids in enumerate(inputs)]), dim=-1)], 1)
