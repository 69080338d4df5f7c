"""CUDA graphs of the decode step: one per (batch bucket, cache-length bucket, sampler kind), captured
on first use or up front by Engine.warmup(), so a decode step costs one replay instead of hundreds of launches."""

import warnings

import torch


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
                self.notes.append(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs")
                warnings.warn(self.notes[-1], RuntimeWarning, stacklevel=3)
                self.enabled = False
        return graph

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
