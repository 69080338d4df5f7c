"""The scheduler: which requests wait and which run, their KV-cache slots (n per request, one per choice,
from admission until it finishes), and what each step prefills. Admission is fair between groups (one
HTTP request's prompts): the group with the fewest running choices goes first, the oldest among equals."""

import heapq
import threading
from collections import Counter, deque

from engine.prefix_cache import BLOCK_TOKENS, shared_blocks

# A request waits a step for a shared prefix another prompt is prefilling only when that prefix is at least
# prefill_chunk / WAIT_SHARE tokens (256 on CUDA): a shorter one costs less to prefill again than the wait.
# lm-eval-shaped 10-shot HellaSwag (4 endings of a ~480-token context; gpt2-xl, H100, engine alone, 64 in
# flight): 335 requests/s at 32 against 275 at 4, where every ending admitted beside its first prefilled the
# context again; 0-shot (20-100 token contexts): 907 against 841. Waiting for any shared block: 331 and 851.
WAIT_SHARE = 32


class Scheduler:
    """add / cancel / stats / has_work are thread-safe; the rest runs on the engine's one loop."""

    def __init__(self, max_batch, prefill_chunk, block_size, prefix):
        self.max_batch, self.prefill_chunk, self.block_size = max_batch, prefill_chunk, block_size
        self.prefix = prefix  # the PrefixCache: lookups here, copies in the runner
        self.lock = threading.Lock()  # the waiting queues and the running list
        self.waiting = {}  # group -> deque of Requests in arrival order; the dict keeps the groups' order
        self.running = []  # admitted Requests: prefilling or decoding
        self.free = list(range(max_batch))  # a heap of free slots: the lowest first keeps batches small
        self.rows = [None] * max_batch  # slot -> Choice

    def add(self, request):
        assert request.n <= self.max_batch and len(request.prompt) <= self.block_size
        with self.lock:
            self.waiting.setdefault(request.group, deque()).append(request)

    def stats(self):
        with self.lock:
            return {"running": len(self.running), "waiting": sum(map(len, self.waiting.values())),
                    "slots_used": self.max_batch - len(self.free), "slots_total": self.max_batch}

    def has_work(self):
        with self.lock:
            return bool(self.waiting or self.running)

    def cancelled(self):
        """Requests cancelled and not ended yet; the waiting ones leave their queue."""
        with self.lock:
            gone = [r for queue in self.waiting.values() for r in queue if r.cancelled]
            if gone:
                queues = {g: deque(r for r in queue if not r.cancelled) for g, queue in self.waiting.items()}
                self.waiting = {g: queue for g, queue in queues.items() if queue}
        return gone + [r for r in self.running if r.cancelled]

    def _admit(self, passed):
        """The next waiting request, given slots for its choices, or None. Groups take turns: the fewest
        running choices first, the oldest among equals. A head waiting for a shared prefix is passed over this
        step (its group joins `passed`: admissions only add prefills to wait for, so it is not asked again);
        one lacking slots stops admission (none overtakes it)."""
        with self.lock:
            busy = Counter()
            for r in self.running:
                busy[r.group] += r.n
            for group in sorted(self.waiting, key=lambda g: busy[g]):  # a stable sort: ties keep their order
                r = self.waiting[group][0]
                if len(self.free) < r.n:
                    return None
                if group in passed:
                    continue
                if not self._waits_for_prefix(r):
                    break
                passed.add(group)
            else:
                return None
            self.waiting[group].popleft()
            if not self.waiting[group]:
                del self.waiting[group]
            self.running.append(r)
            slots = [heapq.heappop(self.free) for _ in range(r.n)]
        for c, s in zip(r.choices, slots):
            c.slot = s
            self.rows[s] = c
        r.match = self.prefix.match(r.prompt, logprobs=r.echo)
        r.filled = max(0, r.match.tokens - r.echo)  # echo: the entry of token m.tokens needs position m.tokens - 1
        return r

    def _waits_for_prefix(self, r):
        """r shares with a prompt still prefilling at least prefill_chunk / WAIT_SHARE tokens the cache lacks
        (requests admitted together would each prefill their common prefix)."""
        n = (len(r.prompt) - 1) // BLOCK_TOKENS if self.prefix.max_blocks else 0
        shared = max((shared_blocks(r.prompt, p.prompt, n) for p in self.running if p.filled < len(p.prompt)),
                     default=0)
        return shared > 0 and (shared - self.prefix.cached_blocks(r.prompt, r.echo)) * BLOCK_TOKENS >= \
            self.prefill_chunk // WAIT_SHARE

    def schedule(self):
        """This step's prefill, at most prefill_chunk prompt tokens (the runner packs them without padding):
        prompts already prefilling, then newly admitted ones -> (rows [(request, start, n)], requests
        admitted)."""
        rows, admitted, budget, passed = [], [], self.prefill_chunk, set()
        pending = [r for r in self.running if r.filled < len(r.prompt) and not r.done]
        while budget > 0:
            if pending:
                r = pending.pop(0)
            else:
                r = self._admit(passed)
                if r is None:
                    break
                admitted.append(r)
            n = min(len(r.prompt) - r.filled, budget)
            rows.append((r, r.filled, n))
            budget -= n
        return rows, admitted

    def decoding(self):
        """The choices that run a decode step now."""
        return [c for c in self.rows if c is not None and c.live()]

    def release(self, choices):
        """Free the slots of choices that finished; drop finished requests."""
        for c in choices:
            if c.finish_reason is not None and c.slot is not None:
                self.rows[c.slot] = None
                heapq.heappush(self.free, c.slot)
                c.slot = None
        with self.lock:
            self.running = [r for r in self.running if not r.done]
