"""CUDA graphs of the decode step: one per (batch bucket, cache-length bucket, sampler kind), captured
on first use or up front by Engine.warmup(), so a decode step costs one replay instead of hundreds of launches.
And of the packed prefill forward, per (tokens, rows, longest row) bucket, captured on first use."""

import warnings

import torch

from model import Packed, pack_host


class DecodeGraphs:
    """The graphs of one ModelRunner's decode_step. A capture that fails turns graphs off, loudly
    (runner.notes), and decoding goes on uncaptured."""

    def __init__(self, runner, enabled):
        if enabled and runner.device.type != "cuda":
            raise ValueError("graphs=True (CUDA graphs) needs a model on a CUDA device")
        self.runner, self.enabled = runner, enabled
        self.graphs, self.pool = {}, None  # (B, L, kind) -> torch.cuda.CUDAGraph
        self.notes = []  # fallbacks taken

    def get(self, B, L, kind):
        """The graph of a decode step, captured on first use; None when graphs are off (a failed capture
        turns them off)."""
        if not self.enabled:
            return None
        graph = self.graphs.get((B, L, kind))
        if graph is None:
            try:
                graph = self.graphs[(B, L, kind)] = self._capture(B, L, kind)
            except Exception as e:  # keep serving: decode uncaptured, loudly
                self.failed(e, "decoding")
        return graph

    def failed(self, error, what):
        """A capture failed: graphs go off (decode and prefill alike), loudly, and `what` runs uncaptured."""
        self.notes.append(f"CUDA graph capture failed ({type(error).__name__}: {error}); {what} without graphs")
        warnings.warn(self.notes[-1], RuntimeWarning, stacklevel=4)
        self.enabled = False

    def _capture(self, B, L, kind):
        """Warm up (compiles if asked) on a side stream, then record one decode step in a graph. The warm-up
        steps really run: the state they change is saved and put back; their cache writes land at or past
        each slot's filled length, which is rewritten before it is read."""
        r = self.runner
        saved = [(t, t.clone()) for t in (r.tok, r.pos, r.j, r.seen, r.counts)]
        side = torch.cuda.Stream(device=r.device)
        side.wait_stream(torch.cuda.current_stream(r.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                r.j.zero_()  # stay inside u / out even when decode_chunk is 1
                r.decode_step(B, L, kind)
        torch.cuda.current_stream(r.device).wait_stream(side)
        for t, copy in saved:
            t.copy_(copy)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            r.decode_step(B, L, kind)
        return graph


# Packed prefill steps are padded to one of these token counts (powers of two and the midpoints between:
# at most a third of a step is padding); a larger step runs uncaptured. 8,192: the CUDA step budget.
PREFILL_TOKENS = sorted({b << k for b in (64, 96) for k in range(8)} - {96 << 7})
# FlashAttention's grid has a block of queries per 128 tokens of the longest row, for every row: a graph
# sized for rows of up to 128 tokens keeps a step of short rests (a cached prefix's) from paying for idle
# blocks of 1,024.
QUERY_BUCKETS = (128, 1024)


def query_buckets(block_size):
    return sorted({min(q, block_size) for q in QUERY_BUCKETS} | {block_size})


def prefill_bucket(lengths, max_batch, block_size):
    """The graph of a step whose rows have these lengths: (N tokens, R rows, longest row Q), padded up; None
    when the step has more tokens than any graph."""
    N = next((b for b in PREFILL_TOKENS if b >= sum(lengths)), None)
    R = min(max_batch, 1 << (len(lengths) - 1).bit_length())
    Q = next(q for q in query_buckets(block_size) if q >= max(lengths))
    return None if N is None else (N, R, Q)


def bucket_steps(max_batch, block_size):
    """Row lengths of a step for every bucket a step can fill (warm-up): one row as long as the bucket's Q
    allows, the others sharing what is left."""
    qs = query_buckets(block_size)
    for N in PREFILL_TOKENS:
        for R in sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)}):
            for below, Q in zip([0] + qs, qs):
                first = min(Q, N - (R - 1))
                rest = [(N - first) // (R - 1) + (i < (N - first) % (R - 1)) for i in range(R - 1)] if R > 1 else []
                fits = 1 <= min(rest, default=1) <= max(rest, default=1) <= first
                if first > below and first + sum(rest) == N and fits:
                    yield [first] + rest


class PrefillGraphs:
    """CUDA graphs of the packed prefill forward (model.hidden over a Packed; FlashAttention, half precision),
    one per (tokens, rows, longest row) bucket, captured on first use. A step of short chunks then costs one
    replay instead of a dozen launches a layer, which an H100's host queues slower than the device runs them
    (GPT-2 1.5B, 8 rows of ~30 tokens: ~25 ms to queue). Padding tokens write to cache slot `spare`, which
    no row reads; padding rows have no tokens."""

    def __init__(self, runner, spare):
        self.runner, self.spare = runner, spare
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()  # (N, R, Q) -> torch.cuda.CUDAGraph
        N, R, dev = PREFILL_TOKENS[-1], runner.max_batch, runner.device
        self.longs = torch.zeros(3 * N, dtype=torch.long, device=dev)  # ids, positions, write of the Packed
        self.ints = torch.zeros(3 * R + 2, dtype=torch.int32, device=dev)  # cu_q, key_start, used
        self.out = torch.zeros(N, runner.config.n_embd, dtype=runner.dtype, device=dev)  # hidden states

    def warmup(self):
        """Capture a graph for every bucket a step can fill -> how many. Each is recorded from dummy rows
        from position 0 of slots 0, 1, ... (free at warm-up; what they write is rewritten before it is read)."""
        for lengths in bucket_steps(self.runner.max_batch, self.runner.config.block_size):
            self.run([([0] * n, slot, 0) for slot, n in enumerate(lengths)])
        return len(self.graphs)

    def run(self, chunks):
        """Queue the packed prefill of chunks [(ids, slot, start)] by a graph -> hidden states (N, C), or None
        when no graph applies (too many tokens, or a capture failed: then loudly, and never again)."""
        lengths = [len(c) for c, _, _ in chunks]
        bucket = prefill_bucket(lengths, self.runner.max_batch, self.runner.config.block_size)
        if bucket is None or not self.runner.graphs.enabled:
            return None
        N, R, Q = bucket
        host = pack_host(chunks, self.runner.config.block_size, (N, R, Q, self.spare))
        longs, ints = self.longs[:3 * N], self.ints[:3 * R + 2]
        longs.copy_(self.runner.upload(host[0].reshape(-1), torch.long))
        ints.copy_(self.runner.upload(host[1], torch.int32))
        graph = self.graphs.get((N, R, Q))
        if graph is None:
            try:
                graph = self.graphs[N, R, Q] = self._capture(N, R, Q, longs, ints)
            except Exception as e:  # keep serving: prefill uncaptured, loudly
                self.runner.graphs.failed(e, "prefilling")
                return None
        graph.replay()
        return self.out[:sum(lengths)]

    def _capture(self, N, R, Q, longs, ints):
        """Warm up on a side stream (it really runs: the same keys and values are written again by the
        replay), then record the forward into self.out, reading the Packed from longs and ints."""
        r = self.runner
        ids, positions, write = longs.view(3, N)
        cu_q, key_start, used = ints.split([R + 1, R + 1, R])
        packed = Packed(positions, write, cu_q, key_start, used, Q, None)

        def forward():
            self.out[:N].copy_(r.model.hidden(ids.view(1, N), cache=r.cache, packed=packed)[0])

        side = torch.cuda.Stream(device=r.device)
        side.wait_stream(torch.cuda.current_stream(r.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(r.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            forward()
        return graph
