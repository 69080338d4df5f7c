"""The engine: continuous batching for one model. Requests join the running batch between steps and
leave it when they finish; step() is the algorithm: schedule, run (and sample, on the device), emit.

On CUDA a decode chunk is queued before the previous one is read (pipelined), so the GPU keeps working
while the host makes text. A batch holding a constrained row (grammar.py) decodes one token per step in
two halves: the forward is queued, a thread fills the grammar masks while the host emits earlier work,
and the next step starts by sampling the batch under them (docs/design.md).
"""

import threading
from collections import deque
from dataclasses import asdict

import numpy as np
import torch

from engine.model_runner import CACHE_BUCKET, FORWARD, ModelRunner, PrefillWork, embed_forward
from engine.sampler import TOPK_CANDIDATES, entry
from engine.scheduler import Scheduler
from engine.sequence import PromptLogprobs, Request

# Prompt (and embedding) tokens a step computes at most (embeddings' padding counted), per device kind. A
# running stream waits for the step's prefill, so this trades prompt throughput against inter-token time.
# CUDA (GPT-2 124M, bf16, H100, bench/prefill.py and serve_load.py, BENCHMARKS.md): 32 prompts of 1,000 tokens
# prefill at 103k tokens/s with 512, 1.08M with 8,192 and 1.15M with 16,384 (the forward alone: 1.46M-1.57M);
# at 8,192 running streams' inter-token p95 rose 2.2x-3.1x while such a burst arrived (after a first burst).
# 16,384 buys 7% more prompt throughput and doubles the largest step's prefill (what a stream waits for), so 8,192.
# CPU (GPT-2 124M, fp32, bench/prefill.py on 2 busy cores): a bigger step is faster per token (4 x 512
# tokens: 273 tokens/s, 1 x 512: 159), but a 512-token step already stalls every running stream for seconds
# there; 512 keeps that stall bounded, and a long prompt still prefills a chunk per step.
PREFILL_CHUNK = {"cuda": 8192, "cpu": 512}
NO_ROWS = PromptLogprobs(np.zeros(0, np.float32), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))  # 1 token


class Engine:
    """max_batch: cache slots. prefill_chunk: prompt and embedding tokens a step computes at most (default:
    PREFILL_CHUNK). prefix_cache_mb: the prefix cache's pool (default: as large as the KV-cache).
    decode_chunk: decode steps per host sync (default 8 on CUDA, 1 elsewhere). graphs: CUDA graphs of
    the decode steps (default: on CUDA). static: bucketed fixed shapes without graphs (default: = graphs;
    on CPU it runs the graph path's logic). compile: torch.compile the decode forward. pipeline: queue a
    chunk before reading the previous one (default: on CUDA). Only step is single-threaded."""

    def __init__(self, model, max_batch=64, prefill_chunk=None, decode_chunk=None, graphs=None, compile=False,
                 static=None, pipeline=None, prefix_cache=True, prefix_cache_mb=None):
        self.runner = ModelRunner(model, max_batch, decode_chunk, graphs, compile, static,
                                  prefix_cache_mb if prefix_cache else 0)
        self.config, self.device, self.max_batch = model.config, self.runner.device, max_batch
        prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(self.device.type, PREFILL_CHUNK["cpu"])
        self.scheduler = Scheduler(max_batch, prefill_chunk, model.config.block_size, self.runner.prefix)
        self.pipeline = self.device.type == "cuda" if pipeline is None else bool(pipeline)
        self._lock = threading.Lock()  # the device state: step, warmup
        self._inflight = []  # queued work whose results are not read yet (pipeline)
        self._masks = None  # a Future of the masks of the constrained forward in _inflight (pipeline)
        self._embeds = deque()  # [job id, id lists, vectors so far] not done yet
        self.embedded = []  # (job id, vectors) done, for the caller to take

    notes = property(lambda self: self.runner.graphs.notes)  # fallbacks taken

    def add(self, prompt_ids, params, n=1, logprobs=None, echo=False, request_id=None, group=None):
        """Queue a request -> its Request; checked at the edge (sampling_params: check_ids, fit; n, logprobs)."""
        req = Request(list(prompt_ids), params, n, logprobs, echo, request_id, group)
        self.scheduler.add(req)
        return req

    def cancel(self, request):
        request.cancelled = True

    def add_embedding(self, job_id, inputs):
        """Queue embeddings of id lists (checked at the edge: check_inputs); steps compute them within their
        budget and put (job_id, a float32 array (len(inputs), C)) in self.embedded: each id list's final
        hidden states, mean-pooled and L2-normalised."""
        self._embeds.append([job_id, inputs, []])

    def stats(self):
        return {**self.scheduler.stats(), "prefix_cache": asdict(self.runner.prefix.stats)}

    def has_work(self):
        return bool(self._inflight or self._embeds) or self.scheduler.has_work()

    @torch.no_grad()
    def warmup(self, kinds=((0, False, False, False), (TOPK_CANDIDATES, False, False, False))):
        """Capture (and compile) the decode steps of every batch and cache-length bucket for these sampler
        kinds (default: greedy, and top-k / top-p without penalties), with the two halves of a constrained
        step, and the packed prefill of every bucket, so no request waits for a capture -> graphs held (0
        without graphs)."""
        block = self.config.block_size
        batches = sorted({min(self.max_batch, 1 << i) for i in range(self.max_batch.bit_length() + 1)})
        lengths = sorted({min(block, L) for L in range(CACHE_BUCKET, block + CACHE_BUCKET, CACHE_BUCKET)})
        graphs, prefill = self.runner.graphs, self.runner.prefill_graphs
        with self._lock:
            captured = prefill.warmup() if prefill and graphs.enabled else 0
            for B in batches:
                for kind in kinds:
                    graphs.get(B, 0, kind[:3] + (True,))  # the masked sampler reads no cache
                for L in lengths:
                    for kind in (*kinds, FORWARD):
                        graphs.get(B, L, kind)
            return len(graphs.graphs) + captured

    @torch.no_grad()
    def step(self):
        """Prefill and embed up to prefill_chunk tokens, decode one chunk for every running row; return
        the Outputs of what finished computing ([] when idle)."""
        with self._lock:
            emitted = []
            if self._masks is not None:  # last step's constrained forward, sampled before any slot changes
                self.runner.sample_masked(self._inflight[0], self._masks.result())
                self._masks = None
            for r in self.scheduler.cancelled():
                for c in r.choices:
                    if c.finish_reason is None:
                        c.finish("cancelled", emitted)
            rows, admitted = self.scheduler.schedule()  # schedule
            if admitted:
                self.runner.load(admitted)
            prefill = self.runner.prefill(rows)  # run: queued on the device, sampled there
            embeds = self._embed_batch(self.scheduler.prefill_chunk - sum(n for *_, n in rows))
            decode = self.runner.decode(self.scheduler.rows, self.scheduler.decoding())
            # pipelined: this step's decode chunk is read next step (the device works meanwhile), and so is a
            # prefill no decode follows (prompts alone, as loglikelihoods: the next step's host work overlaps
            # it); a prefill a decode follows gives its first tokens now
            defer = self.pipeline and decode is None
            earlier = [w for w in self._inflight + [None if defer else prefill] if w is not None]
            masks = self.runner.fill_masks(decode, earlier) if decode and decode.fetch is None else None
            for work in earlier:  # emit
                (self._emit_prefill if isinstance(work, PrefillWork) else self._emit_decode)(work, emitted)
            self._inflight = [w for w in (prefill if defer else None, decode) if w is not None] if self.pipeline else []
            if masks is not None and self.pipeline:  # sampled next step: the host work between overlaps the forward
                self._masks = masks
            elif masks is not None:  # constrained: sampled under the masks of every token so far
                self.runner.sample_masked(decode, masks.result())
            if decode is not None and not self.pipeline:
                self._emit_decode(decode, emitted)
            self.scheduler.release(emitted)
            if embeds:
                self._embedded(*embeds)
            return [c.take() for c in emitted]

    def _emit_prefill(self, work, emitted):
        values = work.fetch.get()
        for r, span in zip(work.finals, work.spans):  # echo: the prompt's logprobs; max_new_tokens 0 ends here
            echo = NO_ROWS
            if span:  # numpy slices, as many top columns as it asked for (another request may ask for more)
                a, b, k = *span, r.logprobs or 0
                echo = PromptLogprobs(values[0][a:b], values[1][a:b, :k], values[2][a:b, :k])
            for c in r.choices:
                if r.echo and c.finish_reason is None:
                    c.output(emitted).prompt_logprobs = echo
                if r.params.max_new_tokens == 0 and c.finish_reason is None:
                    c.finish("length", emitted)
        if work.choices:
            nxt, *lps = values[work.first:]
            for i, c in enumerate(work.choices):
                if c.finish_reason is None:
                    c.feed(nxt[i], entry(nxt[i], *(x[i] for x in lps), c.request.logprobs) if lps else None, emitted)

    def _emit_decode(self, work, emitted):
        ids, *lps = work.fetch.get()
        for b, c in enumerate(work.rows):
            for k in range(work.steps):
                if c is None or c.finish_reason is not None:
                    break
                lp = entry(ids[b][k], *(x[b][k] for x in lps), c.request.logprobs) if lps else None
                c.feed(ids[b][k], lp, emitted)

    def _embed_batch(self, budget):
        """Queue one padded forward over the next embedding inputs (of any jobs, in order), as many as
        budget tokens hold, padding included, at least one -> (their jobs, Fetch), or None."""
        pending = [(job, ids) for job in self._embeds for ids in job[1][len(job[2]):]]
        if not pending:
            return None
        k, width = 1, len(pending[0][1])
        while k < len(pending) and (k + 1) * max(width, len(pending[k][1])) <= budget:
            width, k = max(width, len(pending[k][1])), k + 1
        return [job for job, _ in pending[:k]], embed_forward(self.runner, [ids for _, ids in pending[:k]])

    def _embedded(self, jobs, fetch):
        for job, vector in zip(jobs, fetch.get()[0]):  # numpy: no Python floats in the loop or the pipe
            job[2].append(vector)
        while self._embeds and len(self._embeds[0][2]) == len(self._embeds[0][1]):
            self.embedded.append((self._embeds[0][0], np.stack(self._embeds.popleft()[2])))
