"""GPT-2, written from scratch, with a KV-cache of per-sequence slots for batched decoding. Parameter names
match Hugging Face's GPT-2, so OpenAI's weights map one to one (HF stores Conv1D weights transposed: see
hf_to_ours and ours_to_hf). Shapes in comments: B batch, T query length, S cache slots, L key length,
C n_embd, H n_head, D head size (C // H), V vocab.
"""

import functools
import itertools
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# OpenAI GPT-2 sizes, as published on the HF hub.
PRETRAINED_CONFIGS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# HF's GPT-2 uses Conv1D for these, which stores weights as (in, out): transpose for Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_VOCAB = 50257  # the real tokenizer size; our embedding may be padded past it


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (positions)
    vocab_size: int = 50304  # 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build from a plain dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Packed:
    """Prompt chunks of several cache slots as one sequence of N tokens (a prefill step): row b is n_b tokens
    at positions s_b .. s_b + n_b - 1 of slot k_b and attends to positions 0 .. s_b + n_b - 1 there, causally.
    A layer's cache is seen flat, (S * block_size, H, D). Padding to a CUDA graph's fixed shapes: tokens
    after the rows' (written to a spare slot that no row reads), and rows of no tokens."""
    positions: torch.Tensor  # (N,) each token's position
    write: torch.Tensor  # (N,) where each token's key and value go in the flat cache
    cu_q: torch.Tensor  # (R + 1,) int32: where each row starts among the N tokens, then where the rows end
    key_start: torch.Tensor  # (R + 1,) int32: where each row's slot starts in the flat cache (the last: unused)
    used: torch.Tensor  # (R,) int32: the keys each row attends to, s_b + n_b
    max_q: int  # at least every n_b (FlashAttention's grid)
    rows: list  # (k_b, s_b, n_b) of each row, on the host


def pack_host(chunks, block_size, pad=None):
    """Prompt chunks [(ids, slot, start)] -> the host arrays of their Packed: longs (3, N) (ids, positions,
    write), ints (3R + 2,) (cu_q, key_start, used), max_q, rows. pad: (N, R, max_q, spare slot), the shapes
    to pad to. numpy: a step of 8,192 tokens as Python lists took ~1 ms to build and convert."""
    rows = [(slot, s, len(ids)) for ids, slot, s in chunks]
    slot, start, n = (np.array(x, dtype=np.int64) for x in zip(*rows))
    total, R = int(n.sum()), len(rows)
    N, R_pad, max_q, spare = pad or (total, R, int(n.max()), 0)
    cu = np.concatenate([[0], np.cumsum(n)])
    longs = np.zeros((3, N), dtype=np.int64)
    longs[0, :total] = np.fromiter(itertools.chain.from_iterable(ids for ids, _, _ in chunks), np.int64, total)
    longs[1, :total] = np.arange(total) + np.repeat(start - cu[:-1], n)
    longs[2] = spare * block_size  # padding tokens write to the spare slot's first position
    longs[2, :total] = longs[1, :total] + np.repeat(slot * block_size, n)
    ints = np.zeros(3 * R_pad + 2, dtype=np.int32)  # padding rows: no tokens, no keys
    ints[:R_pad + 1] = total
    ints[:R + 1] = cu
    ints[R_pad + 1:R_pad + 1 + R] = slot * block_size
    ints[2 * R_pad + 2:2 * R_pad + 2 + R] = start + n
    return longs, ints, max_q, rows


def pack(chunks, block_size, upload, pad=None):
    """Prompt chunks [(ids, slot, start)] -> (idx (1, N), their Packed); upload(values, dtype) makes a tensor
    on the model's device. pad: as pack_host's."""
    longs, ints, max_q, rows = pack_host(chunks, block_size, pad)
    R = (len(ints) - 2) // 3
    longs, ints = upload(longs, torch.long), upload(ints, torch.int32).split([R + 1, R + 1, R])
    return longs[0].view(1, -1), Packed(longs[1], longs[2], *ints, max_q, rows)


@functools.cache  # asked in every layer of an uncaptured forward
def flash_varlen(device, dtype):
    """Whether FlashAttention's variable-length kernel runs here: CUDA, half precision, Ampere or newer (a T4
    or V100 has none, and gets attention a row at a time)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and \
        torch.cuda.get_device_capability(device)[0] >= 8


def varlen_causal(q, k_cache, v_cache, p):
    """Attention of the rows of a Packed p: q (N, H, D), the layer's cache (S, block_size, H, D) -> (N, H, D).
    A row's queries are the last of its keys: causal from the bottom right."""
    block = k_cache.size(1)
    if flash_varlen(q.device, q.dtype):  # FlashAttention's variable-length kernel reads
        k, v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # each row's keys in place, bottom-right causal
        return torch.ops.aten._flash_attention_forward(q, k, v, p.cu_q, p.key_start, p.max_q, block, 0.0, True,
                                                       False, seqused_k=p.used)[0]
    assert q.size(0) == sum(n for *_, n in p.rows), "padding needs FlashAttention"
    out, i = [], 0
    for slot, s, n in p.rows:  # no such kernel here: a row at a time
        mask = torch.ones(n, s + n, dtype=torch.bool, device=q.device).tril(s)  # (n, L)
        rk, rv = (t[slot, :s + n].to(q.dtype).transpose(0, 1) for t in (k_cache, v_cache))  # (H, L, D)
        out.append(F.scaled_dot_product_attention(q[i:i + n].transpose(0, 1), rk, rv, attn_mask=mask).transpose(0, 1))
        i += n
    return torch.cat(out)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv=None, where=None):
        """x: (B, T, C). kv: this layer's (k, v) cache, each (S, L_max, H, D), or None for plain
        causal attention; where: (rows, positions, read, mask) of a decode step, or a Packed prefill, see
        GPT.hidden."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))  # (B, T, H, D)
        mask = None
        if isinstance(where, Packed):  # B = 1: the rows of a prefill, one after another
            for cache, new in zip(kv, (k, v)):
                cache.view(-1, *cache.shape[2:]).index_copy_(0, where.write, new[0].to(cache.dtype))
            y = varlen_causal(q[0], *kv, where).reshape(1, T, C)
            return self.resid_dropout(self.c_proj(y))
        if kv is not None:
            rows, positions, read, mask = where
            k_cache, v_cache = kv
            # in place: token t of row b -> slot rows[b], position positions[b, t]
            k_cache.index_put_((rows, positions), k.to(k_cache.dtype))
            v_cache.index_put_((rows, positions), v.to(v_cache.dtype))
            k, v = k_cache[read].to(q.dtype), v_cache[read].to(q.dtype)  # (B, L, H, D)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T or L, D)
            attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, where=None):
        x = x + self.attn(self.ln_1(x), kv, where)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of every layer, allocated once: k[i], v[i] are (S, block_size, H, D), one sequence
    per slot. Per-layer tensors, not one stacked tensor: torch.compile then writes them in place."""

    def __init__(self, config, n_slots, device=None, dtype=torch.float32):
        shape = (n_slots, config.block_size, config.n_head, config.n_embd // config.n_head)
        # zeros: stale positions are masked, but must stay finite (0 * NaN would poison attention)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self._views = {}

    def views(self, slot, n):
        """Positions 0 .. n-1 of one slot in every layer, keys then values: 2 * n_layer (n, H, D) views, made
        once (a copy through them is one torch._foreach_copy_, not two indexing ops and a copy per layer)."""
        if (slot, n) not in self._views:
            self._views[slot, n] = [t[slot, :n] for t in self.k + self.v]
        return self._views[slot, n]

    def blocks(self, size):
        """Every layer's keys, then values, cut into blocks of `size` positions: 2 * n_layer (S, block_size //
        size, size, H, D) views, made once (a prefix cache copies whole blocks of many slots in one op a layer)."""
        if size not in self._views:
            n = self.k[0].size(1) // size
            self._views[size] = [t[:, :n * size].unflatten(1, (n, size)) for t in self.k + self.v]
        return self._views[size]

    def copy_slot(self, src, dst):
        """Slot dst becomes a copy of slot src (a forked sequence)."""
        n = self.k[0].size(1)
        torch._foreach_copy_(self.views(dst, n), self.views(src, n))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2 * n_layer)
        # because each block adds two of them to the residual stream.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, reduction="mean", **cache):
        """idx: (B, T) token ids -> (logits (B, T, V), loss or None). targets (B, T): next-token ids, -1 where
        no loss is wanted; loss: the mean over counted tokens (reduction="mean") or their sum ("sum")."""
        logits = self.lm_head(self.hidden(idx, **cache))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, loss

    def hidden(self, idx, cache=None, pos=None, slots=None, kv_len=None, packed=None):
        """Final hidden states (B, T, C), after ln_f. Without a cache: plain causal attention over idx.
        With a KVCache and pos (a decode step, or any chunk of prompts): row b's tokens sit at positions
        pos[b], pos[b] + 1, ... (pos: (B,) tensor) of cache slot slots[b] (slots: (B,) tensor; None = slots
        0..B-1, read as views); their keys and values are written there, then each query attends to the
        first kv_len positions of its slot, those after its own masked. Shapes depend on B, T and kv_len
        only (CUDA graphs, compile); positions are never checked here (that would sync). With a KVCache
        and packed (a Packed; idx (1, N)): the rows of a prefill step, without padding; on CUDA in half
        precision, FlashAttention's variable-length kernel (an explicit mask, as above, falls back to a
        kernel that also computes the masked half: 43% of an H100's prefill of 32 x 1,000 tokens)."""
        B, T = idx.size()
        steps = torch.arange(T, device=idx.device)  # (T,)
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            positions, where, kvs = steps.unsqueeze(0), None, [None] * self.config.n_layer  # (1, T)
        elif packed is not None:
            positions, where, kvs = packed.positions.view(1, T), packed, list(zip(cache.k, cache.v))
        else:
            positions = pos.view(B, 1) + steps  # (B, T)
            rows = (torch.arange(B, device=idx.device) if slots is None else slots).view(B, 1)
            read = (slice(0, B) if slots is None else slots, slice(0, kv_len))  # (B, L, H, D) of the cache
            key_pos = torch.arange(kv_len, device=idx.device)  # (L,)
            mask = (key_pos <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, L): causal, per row
            where, kvs = (rows, positions, read, mask), list(zip(cache.k, cache.v))
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        for block, kv in zip(self.transformer.h, kvs):
            x = block(x, kv, where)
        return self.transformer.ln_f(x)

    def num_params(self, exclude_positions=False):
        """Parameter count (tied weights once). exclude_positions drops wpe, as in MFU estimates."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6N plus attention's 12 * L * C * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(exclude_positions=True) + 12 * cfg.n_layer * cfg.n_embd * T


def hf_to_ours(hf_state):
    """HF GPT-2 state dict -> ours: drop buffers, add the `transformer.` prefix, transpose Conv1D."""
    out = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older versions
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model checkpoints have no prefix
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[key] = tensor.contiguous()
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])  # tied: often stored once
    return out


def ours_to_hf(state, vocab_size):
    """Our state dict -> HF GPT-2 tensors (Conv1D layout, vocab cut to vocab_size, lm_head tied)."""
    out = {}
    for key, tensor in state.items():
        if key == "lm_head.weight":
            continue  # tied to wte; safetensors refuses shared storage
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if key == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        out[key] = tensor.detach().to("cpu").contiguous().clone()
    return out
