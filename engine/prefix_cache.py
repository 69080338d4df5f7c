"""Automatic prefix caching (vLLM's, with copies instead of paged attention: our KV is one contiguous
row per slot): the KV of full blocks of prompt tokens, keyed by chained hashes, kept in a bounded pool on
the model's device and copied into a new request's slot. docs/design.md has the contract.
Shapes: N pool rows, L layers (2L: keys of each, then values), T = BLOCK_TOKENS, H heads, D head size.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from device import upload

# 16 tokens a block, as vLLM: a prompt reuses its cached prefix to within 15 tokens (HellaSwag's endings
# share contexts of 60-100 tokens; 32-token blocks would re-prefill up to 31 of them), and a 1,024-token
# context is 64 keys to hash per lookup.
BLOCK_TOKENS = 16
ROOT_KEY = b"gpt2-prefix-v1"  # the chain's seed: the key "before" the first block


def block_keys(ids, n_blocks):
    """Keys of the first n_blocks full blocks of ids, lazily. A cryptographic hash: a client cannot craft
    another prefix with the same key (and so read its KV)."""
    data, size, key = array("I", ids[:n_blocks * BLOCK_TOKENS]).tobytes(), 4 * BLOCK_TOKENS, ROOT_KEY
    for j in range(n_blocks):
        key = hashlib.blake2b(key + data[j * size:(j + 1) * size], digest_size=16).digest()
        yield key


def shared_blocks(a, b, n):
    """How many of the first n full blocks the id lists a and b have in common."""
    k, T = 0, BLOCK_TOKENS
    while k < n and len(b) >= (k + 1) * T and a[k * T:(k + 1) * T] == b[k * T:(k + 1) * T]:
        k += 1
    return k


@dataclass
class Match:
    """A cached prefix: its length in tokens and the pool rows holding it, in order."""
    tokens: int = 0
    rows: list = field(default_factory=list)
    logprobs: bool = False  # matched for an echo request: every row holds prompt logprob entries


@dataclass
class PrefixStats:
    """For /metrics and /health. hits / misses count lookups (a hit reuses at least one block)."""
    enabled: bool
    blocks_used: int = 0
    blocks_total: int = 0
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    evicted_blocks: int = 0


def pool_blocks(config, slots, dtype, mb=None):
    """Blocks that fit in mb MiB; None: as many as the KV-cache of `slots` slots holds."""
    if mb is None:
        return slots * config.block_size // BLOCK_TOKENS
    return int(mb * 2**20) // (2 * config.n_layer * BLOCK_TOKENS * config.n_embd * dtype.itemsize)


class PrefixCache:
    """A bounded pool of KV blocks for one model.KVCache layout; used by the engine's loop only."""

    def __init__(self, config, max_blocks, device=None, dtype=torch.float32):
        T, H = BLOCK_TOKENS, config.n_head
        self.max_blocks, self.device = int(max_blocks), torch.device(device or "cpu")
        shape = (2 * config.n_layer, self.max_blocks, T, H, config.n_embd // H)  # keys of every layer, then values
        self.kv = torch.zeros(shape, device=device, dtype=dtype) if self.max_blocks else None  # (2L, N, T, H, D)
        self.lp = None  # echo entries, allocated at the first store that has them: (N, T), (N, T, K), (N, T, K)
        self._row = {}  # key -> pool row
        self._key = [None] * self.max_blocks  # pool row -> key (None: free)
        self._has_lp = [False] * self.max_blocks
        self._lru = OrderedDict()  # keys of cached rows, least recently used first
        self._free = list(range(self.max_blocks - 1, -1, -1))  # pop() gives the lowest row first
        self.stats = PrefixStats(enabled=self.max_blocks > 0, blocks_total=self.max_blocks)

    def _lookup(self, ids, logprobs):
        """Pool rows of the longest cached prefix of ids (full blocks, never the last token's block)."""
        rows = []
        for key in block_keys(ids, (len(ids) - 1) // BLOCK_TOKENS if self.max_blocks else 0):
            row = self._row.get(key)
            if row is None or (logprobs and not self._has_lp[row]):
                break
            rows.append(row)
        return rows

    def cached_blocks(self, ids, logprobs=False):  # the longest cached prefix, in blocks
        return len(self._lookup(ids, logprobs))

    def match(self, ids, logprobs=False):
        """The longest cached prefix of ids (full blocks, never the last token's block, whose logits give the
        first new token); logprobs: only blocks holding echo entries. Counted in the stats."""
        rows = self._lookup(ids, logprobs)
        self._touch(rows)
        s = self.stats
        s.hits, s.misses = s.hits + bool(rows), s.misses + (not rows)
        s.hit_tokens += len(rows) * BLOCK_TOKENS
        return Match(len(rows) * BLOCK_TOKENS, rows, bool(logprobs))

    def load(self, matches, cache, slots):
        """Queue copies of each match's KV into positions 0 .. match.tokens - 1 of its cache slot -> per match,
        for a logprobs one, the echo entries predicting tokens 1 .. match.tokens - 1 (logprob (P,), top ids
        (P, K), top logprobs (P, K)); else None. A gather and a scatter a layer for all of a step's matches,
        whatever their number. Copies queue on the current stream, in order: a later store into a row cannot
        overtake them."""
        todo = [(i, m) for i, m in enumerate(matches) if m.rows]
        out = [None] * len(matches)
        if not todo:
            return out
        echo = [(i, m) for i, m in todo if m.logprobs]
        rows = [row for _, m in todo for row in m.rows]
        dst = [slots[i] for i, m in todo for _ in m.rows] + [j for _, m in todo for j in range(len(m.rows))]
        index = upload(rows + dst + [row for _, m in echo for row in m.rows], torch.long, self.device)
        src, slot, block = index[:3 * len(rows)].view(3, -1)
        for pool, blocks in zip(self.kv, cache.blocks(BLOCK_TOKENS)):
            blocks.index_put_((slot, block), pool.index_select(0, src))
        if echo:
            picked = index[3 * len(rows):]
            parts = zip(*(t.index_select(0, picked).split([len(m.rows) for _, m in echo]) for t in self.lp))
            for (i, _), entries in zip(echo, parts):
                out[i] = tuple(t.flatten(0, 1)[1:] for t in entries)  # token 0 has no entry
        return out

    def store(self, prompts, cache, entries=None):
        """Keep the full blocks of each prompt [(ids, slot, at)] whose KV cache slot `slot` holds, with its echo
        entries where at is not None: rows at .. at + len(ids) - 2 of entries (logprob (E,), top ids (E, K), top
        logprobs (E, K), as load returns them, a step's prompts one after another). Under pressure only a head
        of a prefix is kept (its own rows are never recycled for it). A gather and a copy a layer for all."""
        slots, blocks, rows_new, echo, keep = [], [], [], [], set()  # echo: (at, the prompt's rows); keep: claimed
        for ids, slot, at in prompts:
            rows, new = self._claim(ids, keep)
            slots += [slot] * len(new)
            blocks += [j for j, _ in new]
            rows_new += [row for _, row in new]
            if at is not None:
                echo.append((at, rows))
        if rows_new:
            slot, block, dst = upload(slots + blocks + rows_new, torch.long, self.device).view(3, -1)
            for pool, kv in zip(self.kv, cache.blocks(BLOCK_TOKENS)):
                pool.index_copy_(0, dst, kv[slot, block])
        if echo:
            self._store_logprobs(echo, entries)
        self.stats.blocks_used = len(self._row)

    def _claim(self, ids, keep):
        """Pool rows for the full blocks of ids, most recently used, none taken from keep (rows claimed so far
        in this store: one copy writes them all), which gains them -> (rows, [(block index, row) of those not
        cached before]); fewer under pressure."""
        rows, new = [], []
        for j, key in enumerate(block_keys(ids, len(ids) // BLOCK_TOKENS if self.max_blocks else 0)):
            row = self._row.get(key)
            if row is None:
                row = self._take(keep)
                if row is None:
                    break
                self._key[row], self._row[key] = key, row
                new.append((j, row))
            rows.append(row)
            keep.add(row)
            self._lru[key] = None
        self._touch(rows)
        return rows, new

    def _store_logprobs(self, echo, entries):
        """Echo entries for the blocks that lack them, of prompts [(at, rows)]: block j keeps those predicting
        its tokens, rows at + j*T - 1 .. at + j*T + T - 2 of entries (the first token has none: its place
        holds another row, which load drops)."""
        T = BLOCK_TOKENS
        missing = [(at + j * T - 1, row) for at, rows in echo for j, row in enumerate(rows) if not self._has_lp[row]]
        if not missing:
            return
        if self.lp is None:
            self.lp = tuple(torch.zeros((self.max_blocks, T, *t.shape[1:]), device=self.device, dtype=t.dtype)
                            for t in entries)
        first = np.array([start for start, _ in missing]).reshape(-1, 1)
        pick = upload(np.maximum(first + np.arange(T), 0).ravel(), torch.long, self.device)
        dst = upload([row for _, row in missing], torch.long, self.device)
        for pool, t in zip(self.lp, entries):
            pool.index_copy_(0, dst, t.index_select(0, pick).view(len(missing), T, *t.shape[1:]))
        for _, row in missing:
            self._has_lp[row] = True

    def _take(self, keep):
        """A row for a new block: a free one, else the least recently used one not in keep."""
        if self._free:
            return self._free.pop()
        for key in self._lru:
            row = self._row[key]
            if row not in keep:
                del self._lru[key], self._row[key]
                self._key[row], self._has_lp[row] = None, False
                self.stats.evicted_blocks += 1
                return row
        return None

    def _touch(self, rows):
        """Most recently used: the chain back to front, so its head is the last to go."""
        for row in reversed(rows):
            self._lru.move_to_end(self._key[row])
