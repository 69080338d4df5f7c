"""One HTTP request's generations, seen from its request thread: the reader thread puts each step's
outputs on the reply's queue; an ApiError put there ends it early (shutdown, engine failure)."""

import queue
import time
from dataclasses import dataclass

from server.config import ApiError, ClientGone, client_gone

KEEPALIVE_S = 15.0  # an SSE comment after this long without a token keeps proxies from closing the stream
POLL_S = 0.05  # how often a request thread waiting for tokens checks that its client is still there


@dataclass(eq=False)
class Handle:
    """The server's side of one engine request (one prompt): choices base .. base + n - 1 of its reply."""

    id: int
    n: int
    reply: "Reply"
    base: int
    finished: int = 0  # choices

    @property
    def done(self):
        return self.finished == self.n


class Reply:
    """One HTTP request's engine requests (a Handle per prompt)."""

    def __init__(self, n_choices, stream):
        self.stream, self.size = stream, n_choices  # size: what it holds against --max-queue
        self.handles = []  # a Handle per prompt
        # lists of (choice, Output), or the ApiError that ended the reply; a SimpleQueue waits in C: half the
        # CPU of a Queue per POLL_S wake-up, a tenth per hand-over
        self.queue = queue.SimpleQueue()
        self.pending = []  # not streamed: outputs held until a choice ends (no wake-up per step)
        self.open = n_choices  # choices not finished yet
        self.started = False  # first output seen: no longer "queued"
        self.ended = None  # the ApiError that ended it, if any
        self.t0 = time.perf_counter()
        self.t_first = self.t_last = self.t_end = None
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reasons = {}

    def _next(self):
        """The next outputs [(choice, Output), ...], [] after POLL_S; raises the ApiError that ended the reply."""
        try:
            item = self.queue.get(timeout=POLL_S)
        except queue.Empty:
            return []
        if isinstance(item, ApiError):
            raise item
        for index, out in item:
            if out.finish_reason is not None:
                self.open -= 1
                self.finish_reasons[index] = out.finish_reason
        return item

    def items(self, environ, keepalive=False):
        """Yield (choice, Output) until every choice has finished (None after KEEPALIVE_S idle, if asked);
        raises ClientGone once the client has closed its connection."""
        idle = 0.0
        while self.open:
            got = self._next()
            if client_gone(environ):
                raise ClientGone()
            idle = 0.0 if got else idle + POLL_S
            if keepalive and idle >= KEEPALIVE_S:
                idle = 0.0
                yield None  # a keep-alive
            yield from got

    def drain(self, timeout=2.0):
        """After a cancel: wait (bounded) for the engine to end every choice, so the log tells the truth."""
        deadline = time.monotonic() + timeout
        try:
            while self.open and time.monotonic() < deadline:
                self._next()
        except ApiError:
            pass

    def timings(self):
        end = self.t_end or time.perf_counter()
        ms = lambda t: None if t is None else round((t - self.t0) * 1e3, 2)  # noqa: E731
        return {"first_token_ms": ms(self.t_first), "total_ms": ms(end)}

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def deliver(self, handle, out, now, metrics):
        """One engine Output of one of its handles -> the queue, with the token metrics (the reader
        thread, under the client's lock) -> True once the handle's last choice has finished."""
        n_new = len(out.token_ids)
        metrics.tokens.labels("completion").inc(n_new)
        if n_new:  # one observation per output: the mean gap of its tokens
            metrics.ttft.observe(now - self.t0) if self.t_last is None else \
                metrics.itl.observe((now - self.t_last) / n_new)
            self.t_first, self.t_last = self.t_first or now, now
        if out.finish_reason is not None:
            handle.finished += 1
            self.completion_tokens += (out.usage or {}).get("completion_tokens", 0)
            if out.finish_reason == "cancelled":
                metrics.cancelled.inc()
        if self.ended is None:
            self.started = True
            self.pending.append((handle.base + out.index, out))
            if self.stream or out.finish_reason is not None:
                self.queue.put(self.pending)
                self.pending = []
        return handle.done
