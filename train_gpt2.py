"""
Pretrain GPT-2 on token shards (fineweb.py output): one process, or DDP under torchrun.

    python fineweb.py --input ../shared/data/corpus/standard-ebooks.jsonl.xz --out-dir data/books --shard-size 10000000
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --data-dir data/fineweb --out-dir out/pretrain
    python train_gpt2.py --data-dir data/books --out-dir out/books --init-from resume   # continue exactly

What a step does (Trainer.train_step): fetch the step's micro-batches (prefetched in a thread, pinned
memory, non_blocking copies), forward each under bf16 autocast (CUDA) with reduction="sum", scale
by 1 / (targets counted over all micro-batches and ranks), backward (DDP gradient all-reduce only
on the last micro-step), clip the gradient norm to 1.0, set the warmup + cosine LR, fused AdamW
step. No host syncs inside a step: the loss stays on the device until a log step.

torch.compile (--compile, default on CUDA) compiles the model used by the training step and the
val-loss pass (fixed shapes, so at most one extra graph for eval mode). HellaSwag and sampling use
the uncompiled `raw_model` (same parameters): their shapes change with every prompt and the
KV-cache position is a Python int, so a compiled module would recompile on every call and hit
dynamo's recompile limit; the eager module runs them correctly at a negligible cost.

Reusable API (finetune_dolly.py imports these instead of copying them):

    cfg = TrainConfig(out_dir=..., batch_size=B, seq_len=T, total_batch_size=tokens_per_step,
                      max_steps=..., lr=..., ...)            # every field documented on the class
    trainer = Trainer(model, cfg, train_data, val_data=None, dist=None, kind="pretrain" | "sft",
                      optimizer=None, eval_hooks=(), checkpoint_hook=None, args=None)
    trainer.restore(ckpt)        # --init-from resume: weights, optimizer, step, data position, RNG
    trainer.fit()                # the loop: log / eval / checkpoint / signals / OOM; returns metrics
    trainer.train_step()         # one optimizer step -> (loss, grad_norm) device tensors (no sync)
    trainer.evaluate()           # val loss (all-reduced) + eval hooks -> dict
    trainer.save_checkpoint(path=None)   # DESIGN.md format via checkpoint.save_checkpoint (rank 0)

  train_data: any object with
    next_batch() -> (x, y)        CPU int64 tensors (batch_size, T); y = -1 where no loss is wanted
    state_dict() / load_state_dict(state)   its position, so a resume continues exactly; the same
                                  on every rank (rank 0's is saved)
    set_batch_size(b)             (optional) used when a CUDA OOM halves the micro batch; the union
                                  of the step's batches must not change
  Under DDP each rank builds its own train_data (rank, world_size) giving disjoint batches.
  val_data: any object with batches() -> iterable of (x, y) for this rank (y = -1: not counted).
  The loss of a step is sum(token losses) / (tokens counted over all micro-batches and ranks), so
  masked (SFT) batches weigh every counted token equally, whatever their counts per micro-batch.
  eval_hooks: callables hook(trainer) -> dict run at every evaluation on every rank (they may use
    collectives); float values are logged, a "samples" list of str is printed and written to
    {out_dir}/samples.jsonl. make_hellaswag_hook and make_sample_hook build the standard ones.
  checkpoint_hook: hook(trainer, path, metrics) on rank 0 after each checkpoint is written
    (e.g. keep a copy of the best val loss).
  Subclasses may override (finetune_dolly.SFTTrainer does): save_checkpoint(path, metrics),
    evaluate(), fit(), _train_record(loss, norm, steps, seconds) -> the log record of a log step,
    and call _print(record) / _write_log(record) / train_state(). Attributes: raw_model (eager,
    canonical names), fwd_model (compiled or raw), model (what the step calls: DDP-wrapped under
    torchrun), optimizer, step (completed steps), micro_batch, grad_accum, metrics, dist, device,
    ptdtype (autocast dtype).
  Helpers: TokenWindows (shard data source), ValWindows, load_model (checkpoint / GPT-2 name / HF
  folder), build_model_for_init, sample_text, lr_at, detect_peak_flops, plot_log.
"""

import argparse
import contextlib
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from checkpoint import (CKPT_NAME, CheckpointError, capture_rng_state, load_checkpoint, load_model,
                        model_from_checkpoint, restore_rng_state)
from checkpoint import save_checkpoint as write_checkpoint
from common import UserError, atomic_path, pick_device, pick_dtype, run_cli, setup_distributed, teardown_distributed
from common import DistInfo
from fineweb import list_shards, read_shard
from hellaswag import evaluate, load_examples
from model import GPT, GPT2_VOCAB, PRETRAINED_CONFIGS, GPTConfig, KVCache
from tokenizer import EOT_ID, decode, encode

# bf16 dense tensor-core peak FLOP/s by GPU name (first match wins; no sparsity). Unknown -> no MFU.
PEAK_BF16_FLOPS = [
    (r"h100.*(pcie)", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h800.*pcie", 756e12),
    (r"\bh(100|800)\b", 989e12),  # SXM / HBM3
    (r"\bg?h200\b", 989e12),
    (r"\bb200\b", 2250e12),
    (r"\bgb200\b", 2500e12),
    (r"\ba(100|800)\b", 312e12),
    (r"\ba10\b", 125e12),
    (r"\bl40s\b", 362e12),
    (r"\bl40\b", 181e12),
    (r"\bl4\b", 121e12),
    (r"rtx 6000 ada", 364e12),
    (r"\b4090\b", 165e12),
    (r"\b3090\b", 71e12),
]


SDPA_BACKENDS = {  # --sdpa-backend name -> torch.nn.attention.SDPBackend member
    "flash": lambda b: b.FLASH_ATTENTION, "cudnn": lambda b: b.CUDNN_ATTENTION,
    "efficient": lambda b: b.EFFICIENT_ATTENTION, "math": lambda b: b.MATH,
}


def detect_peak_flops(device):
    """bf16 dense peak FLOP/s of the CUDA device, from its name; None when unknown or not CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name):
    low = name.lower()
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, low):
            return flops
    return None


def lr_at(step, max_steps, warmup_steps, lr, min_lr):
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at max_steps (step is 0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ====================================================================== data

class TokenWindows:
    """Training batches from token shards, read as one concatenated, memory-mapped stream.

    Window i is tokens [i*T, i*T + T + 1): x its first T tokens, y the last T. Windows cross shard
    boundaries, so no token is dropped there (only the final < T tokens of the whole stream).
    Epoch e visits all windows in the order np.random.default_rng([seed, e]).permutation; the
    epochs follow each other as one endless sequence, so a batch may straddle two epochs.
    A step takes the next batch_size * world_size windows per micro-step: rank r gets windows
    [r*B, (r+1)*B) of each group, so the ranks' micro-batches of a step are exactly the micro-batches
    one process would take for the same total batch. State: (epoch, position) of the next group.
    """

    def __init__(self, paths, seq_len, batch_size, rank=0, world_size=1, seed=0):
        if not paths:
            raise UserError("no token shards given")
        self.paths = [os.fspath(p) for p in paths]
        self.shards = [read_shard(p) for p in self.paths]
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # (n_shards + 1,) stream offsets
        self.n_tokens = int(self.starts[-1])
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.batch_size = batch_size
        self.n_windows = (self.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the shards hold {self.n_tokens} tokens: too few for one sequence of {seq_len} + 1")
        self.global_window = 0  # windows consumed by all ranks since epoch 0
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def _tokens(self, start, length):
        """Tokens [start, start + length) of the concatenated stream, as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right") - 1)
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            piece = self.shards[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def next_batch(self):
        """(x, y): (batch_size, seq_len) int64 CPU tensors of this rank."""
        B, T = self.batch_size, self.seq_len
        first = self.global_window + self.rank * B
        rows = np.empty((B, T + 1), dtype=np.int64)
        for k in range(B):
            g = first + k
            window = int(self._perm(g // self.n_windows)[g % self.n_windows])
            rows[k] = self._tokens(window * T, T + 1)
        self.global_window += self.world_size * B
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def set_batch_size(self, batch_size):
        self.batch_size = batch_size

    def state_dict(self):
        return {"epoch": self.global_window // self.n_windows, "position": self.global_window % self.n_windows,
                "n_windows": self.n_windows, "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state):
        if state.get("n_windows", self.n_windows) != self.n_windows or state.get("seq_len", self.seq_len) != self.seq_len:
            raise UserError(
                f"the data changed since the checkpoint: it had {state.get('n_windows')} windows of "
                f"{state.get('seq_len')} tokens, now {self.n_windows} of {self.seq_len} (same shards and --block-size?)"
            )
        if state.get("seed", self.seed) != self.seed:
            print(f"warning: data order seed changes from {state['seed']} to {self.seed} at resume", file=sys.stderr)
        self.global_window = int(state["epoch"]) * self.n_windows + int(state["position"])


class ValWindows:
    """The first max_windows non-overlapping windows of the val shards, split over ranks.

    Rank r takes windows r, r + W, ...; batches have a fixed shape (batch_size, T) (a short last
    batch is padded with rows whose targets are -1, not counted), so a compiled model sees one
    shape. The val loss is the same whatever the number of ranks.
    """

    def __init__(self, paths, seq_len, batch_size, max_windows, rank=0, world_size=1):
        self.stream = TokenWindows(paths, seq_len, batch_size)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.n_windows = min(max_windows, self.stream.n_windows)

    def batches(self):
        B, T = self.batch_size, self.seq_len
        mine = list(range(self.rank, self.n_windows, self.world_size))
        for i in range(0, len(mine), B):
            rows = np.zeros((B, T + 1), dtype=np.int64)
            counted = np.zeros(B, dtype=bool)
            for k, w in enumerate(mine[i:i + B]):
                rows[k] = self.stream._tokens(w * T, T + 1)
                counted[k] = True
            x = torch.from_numpy(rows[:, :-1].copy())
            y = torch.from_numpy(rows[:, 1:].copy())
            y[torch.from_numpy(~counted)] = -1
            yield x, y


class Prefetcher:
    """Runs a data source's next_batch() in a background thread, `depth` batches ahead.

    Batches are pinned (pin=True) so host-to-device copies can be non_blocking. state_dict() is
    the source's state right after the last batch handed out, never that of prefetched ones, so
    checkpoints and batch-size changes stay exact.
    """

    def __init__(self, source, depth=4, pin=False):
        self.source, self.depth, self.pin = source, depth, pin
        self._state = source.state_dict()
        self._thread = None
        self._queue = None
        self._stop = threading.Event()

    @property
    def batch_size(self):
        return self.source.batch_size

    def _run(self, q, stop):
        try:
            while not stop.is_set():
                x, y = self.source.next_batch()
                state = self.source.state_dict()
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                item = (x, y, state)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            q.put((e, None, None))

    def _start(self):
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def close(self):
        """Stop the thread and put the source back at the position of the last batch handed out."""
        if self._thread is not None:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
            self._thread.join()
            self._thread = None
            self.source.load_state_dict(self._state)

    def next_batch(self):
        if self.depth <= 0:
            batch = self.source.next_batch()
            self._state = self.source.state_dict()
            return batch
        if self._thread is None:
            self._start()
        x, y, state = self._queue.get()
        if isinstance(x, BaseException):
            self._thread = None
            raise x
        self._state = state
        return x, y

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state):
        self.close()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def set_batch_size(self, batch_size):
        self.close()
        self.source.set_batch_size(batch_size)


# ====================================================================== models in

def build_model_for_init(init_from, out_dir, config, kind="pretrain"):
    """--init-from: 'scratch' (GPT(config)), 'resume' ({out_dir}/ckpt.pt, everything), or weights only.

    Returns (model, ckpt_to_resume_or_None). Seed torch before calling for a reproducible scratch init.
    """
    if init_from == "scratch":
        return GPT(config), None
    if init_from == "resume":
        path = os.path.join(out_dir, CKPT_NAME)
        if not os.path.isfile(path):
            raise UserError(f"--init-from resume: no checkpoint at {path}")
        ckpt = load_checkpoint(path)
        if ckpt["kind"] != kind:
            raise UserError(f"--init-from resume: {path} is a {ckpt['kind']!r} checkpoint, this run trains {kind!r}")
        return model_from_checkpoint(ckpt, path), ckpt
    model, _ = load_model(init_from, dropout=config.dropout)
    return model.train(), None


# ====================================================================== sampling

@torch.no_grad()
def sample_text(model, prompt, max_new_tokens=48, temperature=1.0, top_k=50, seed=0, device=None,
                autocast_dtype=None):
    """Continue `prompt` with a KV-cache (eager module; temperature 0 = greedy). Returns the new text."""
    device = torch.device(device or next(model.parameters()).device)
    ids = encode(prompt) or [EOT_ID]
    block = model.config.block_size
    ids = ids[-(block - 1):] if max_new_tokens > 0 else ids[-block:]
    max_new_tokens = min(max_new_tokens, block - len(ids))
    use_autocast = autocast_dtype not in (None, torch.float32)
    cache_dtype = autocast_dtype if use_autocast else torch.float32
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device=device, dtype=cache_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)  # local: the training RNG stays untouched
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if use_autocast else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out = []
    try:
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_new_tokens):
            with autocast:
                logits, _ = model(idx, kv_cache=cache)  # (1, T, V)
            logits = logits[0, -1, :GPT2_VOCAB].float()  # never the padding ids
            if temperature <= 0:
                nxt = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if nxt == EOT_ID:
                break
            out.append(nxt)
            idx = torch.tensor([[nxt]], dtype=torch.long, device=device)
    finally:
        model.train(was_training)
    return decode(out)


# ====================================================================== the training loop

@dataclass
class TrainConfig:
    """Everything the loop needs. Token counts are global (all ranks)."""
    out_dir: str = "out/pretrain"
    batch_size: int = 64  # micro batch, sequences per rank per micro-step
    seq_len: int = 1024  # T
    total_batch_size: int = 524288  # tokens per optimizer step; gradient accumulation fills the gap
    max_steps: int = 19073
    warmup_steps: int = 715
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    eval_interval: int = 250  # 0: never evaluate
    ckpt_interval: int = 1000  # 0: checkpoint only at the end (and on a signal)
    log_interval: int = 10
    stop_at_step: int = None  # stop (checkpoint, exit) after this step, as if interrupted; schedule unchanged
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: bf16 on CUDA; float32 elsewhere
    compile: bool = False
    compile_mode: str = None  # torch.compile mode: default, reduce-overhead, max-autotune, ...
    compile_fullgraph: bool = False
    compile_backend: str = "inductor"
    prefetch: int = 4  # batches loaded ahead in a thread (0: inline)
    sdpa_backend: str = "auto"  # attention kernel for training: auto | flash | cudnn | efficient | math
    loss_chunk: int = 0  # >0: model.loss_chunk_size, the chunked LM-head loss (no whole logits); 0: plain
    auto_shrink_batch: bool = True  # CUDA OOM: halve the micro batch, double accumulation
    plot: bool = True  # loss-curve PNG at the end
    log_name: str = "log.jsonl"


class Trainer:
    """The training loop, shared by pretraining (train_gpt2.py) and fine-tuning (finetune_dolly.py)."""

    def __init__(self, model, config, train_data, val_data=None, *, dist=None, kind="pretrain", optimizer=None,
                 eval_hooks=(), checkpoint_hook=None, args=None, model_config=None):
        self.cfg = cfg = config
        self.dist = dist or DistInfo(False, 0, 0, 1, pick_device(cfg.device))
        self.device = self.dist.device
        self.kind = kind
        self.args = dict(args or asdict(cfg))
        self.ptdtype = pick_dtype(cfg.dtype, self.device)
        if self.ptdtype == torch.float16:
            raise UserError("--dtype float16 needs loss scaling, which this loop does not do: use bfloat16 or float32")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True
        self.raw_model = model.to(self.device)
        self.model_config = model_config or self.raw_model.config.to_dict()
        if cfg.seq_len > self.raw_model.config.block_size:
            raise UserError(f"sequence length {cfg.seq_len} exceeds the model's block_size {self.raw_model.config.block_size}")
        self.optimizer = optimizer or self.raw_model.configure_optimizers(
            cfg.weight_decay, cfg.lr, betas=(cfg.beta1, cfg.beta2), device_type=self.device.type)
        if cfg.loss_chunk:  # model.LinearCrossEntropy: the training loss without the whole (B*T, V) logits
            self.raw_model.loss_chunk_size = cfg.loss_chunk
        self.fwd_model = self._compile(self.raw_model) if cfg.compile else self.raw_model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.fwd_model, device_ids=ids, gradient_as_bucket_view=True)
        else:
            self.model = self.fwd_model
        self.train_data = Prefetcher(train_data, depth=cfg.prefetch, pin=self.device.type == "cuda")
        self.val_data = val_data
        self.eval_hooks = list(eval_hooks)
        self.checkpoint_hook = checkpoint_hook
        self.micro_batch = cfg.batch_size
        self.grad_accum = self._grad_accum(cfg.batch_size)
        self.step = 0
        self.metrics = {}
        self.elapsed_before = 0.0  # seconds trained before a resume
        self.peak_flops = detect_peak_flops(self.device)
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        self._stop_requested = False
        self._control_group = None

    # ------------------------------------------------------------------ setup helpers

    def _compile(self, model):
        kwargs = {"fullgraph": self.cfg.compile_fullgraph, "backend": self.cfg.compile_backend}
        if self.cfg.compile_mode not in (None, "", "default"):
            kwargs["mode"] = self.cfg.compile_mode
        return torch.compile(model, **kwargs)

    def _grad_accum(self, micro_batch):
        per_micro = micro_batch * self.cfg.seq_len * self.dist.world_size
        if self.cfg.total_batch_size % per_micro:
            raise UserError(
                f"--total-batch-size {self.cfg.total_batch_size} is not a multiple of batch_size x seq_len x "
                f"world_size = {micro_batch} x {self.cfg.seq_len} x {self.dist.world_size} = {per_micro}"
            )
        return self.cfg.total_batch_size // per_micro

    @property
    def is_main(self):
        return self.dist.is_main

    def autocast(self):
        if self.ptdtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.ptdtype)

    def attention_kernel(self):
        """The SDPA backend forced for training steps (active while compiling too), or PyTorch's choice."""
        if self.cfg.sdpa_backend in (None, "", "auto"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPA_BACKENDS[self.cfg.sdpa_backend](SDPBackend)])

    def lr(self, step=None):
        c = self.cfg
        return lr_at(self.step if step is None else step, c.max_steps, c.warmup_steps, c.lr, c.min_lr)

    # ------------------------------------------------------------------ the step

    def _fetch_step_batches(self):
        return [self.train_data.next_batch() for _ in range(self.grad_accum)]

    def train_step(self, batches=None):
        """One optimizer step over grad_accum micro-batches. Returns (loss, grad_norm) as device tensors.

        On CUDA OOM in forward/backward (single process, auto_shrink_batch): halve the micro batch,
        double accumulation and redo the step on the same data.
        """
        batches = batches if batches is not None else self._fetch_step_batches()
        while True:
            try:
                loss = self._forward_backward(batches)
                break
            except torch.cuda.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                batches = self._shrink_after_oom(batches)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                              self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    def _forward_backward(self, batches):
        """Accumulate gradients of sum(token losses) / (counted tokens, all micro-batches and ranks)."""
        n_local = sum(int((y != -1).sum()) for _, y in batches)  # CPU tensors: no device sync
        world = self.dist.world_size
        if self.dist.enabled:
            count = torch.tensor(float(n_local), device=self.device)
            torch.distributed.all_reduce(count)  # stream-ordered; the host does not wait
            scale = world / count.clamp_min(1.0)  # DDP averages gradients over ranks: undo the 1/W
        else:
            scale = 1.0 / max(n_local, 1)
        loss_sum = torch.zeros((), device=self.device)
        nb = self.device.type == "cuda"
        for m, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)  # (B, T)
            last = m == len(batches) - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync, self.attention_kernel():
                with self.autocast():
                    loss = self.model(x, y, reduction="sum")[1] * scale  # logits freed right here
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum  # this rank's share x W: the mean over ranks is the step's mean loss

    def _shrink_after_oom(self, batches):
        if self.dist.enabled or not self.cfg.auto_shrink_batch:
            raise UserError(
                f"CUDA out of memory at micro batch {self.micro_batch} x {self.cfg.seq_len} tokens"
                + ("" if self.dist.enabled else "; lower --batch-size")
                + (" (under DDP the micro batch is sized once, before training)" if self.dist.enabled else "")
            ) from None
        torch.cuda.empty_cache()
        if self.micro_batch == 1:
            raise UserError(f"CUDA out of memory even at micro batch 1 x {self.cfg.seq_len} tokens: "
                            f"use a smaller model or --block-size") from None
        self._set_micro_batch(self._smaller_micro_batch(self.micro_batch), reason="oom")
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])  # the step's rows, in order
        return list(zip(x.split(self.micro_batch), y.split(self.micro_batch)))

    def _smaller_micro_batch(self, b):
        """About half of b, such that the total batch still divides evenly into micro-batches."""
        per_rank = self.cfg.total_batch_size // (self.cfg.seq_len * self.dist.world_size)
        smaller = max(1, b // 2)
        while smaller > 1 and per_rank % smaller:
            smaller -= 1
        return smaller

    def _set_micro_batch(self, micro_batch, reason):
        old = self.micro_batch
        self.grad_accum = self._grad_accum(micro_batch)
        self.micro_batch = micro_batch
        self.train_data.set_batch_size(micro_batch)
        msg = (f"{reason}: micro batch {old} -> {micro_batch}, gradient accumulation -> {self.grad_accum} "
               f"(same {self.cfg.total_batch_size} tokens per step)")
        if self.is_main:
            print(msg, file=sys.stderr)
            self._write_log({"step": self.step, "event": reason, "micro_batch": micro_batch,
                             "grad_accum": self.grad_accum})

    def fit_micro_batch(self):
        """CUDA only: find the largest micro batch (halving) whose forward + backward fits; all ranks agree.

        Runs on zeros, under no_sync, with the RNG forked, so it changes no state but the memory cache.
        """
        if self.device.type != "cuda" or not self.cfg.auto_shrink_batch:
            return self.micro_batch
        b = self.micro_batch
        while True:
            try:
                with torch.random.fork_rng(devices=[self.device]):
                    x = torch.zeros(b, self.cfg.seq_len, dtype=torch.long, device=self.device)
                    sync = self.model.no_sync() if self.dist.enabled else contextlib.nullcontext()
                    with sync, self.attention_kernel():
                        with self.autocast():
                            loss = self.model(x, x, reduction="sum")[1]
                        loss.backward()
                    del loss, x
                    torch.cuda.synchronize(self.device)
                break
            except torch.cuda.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if b == 1:
                    raise UserError(f"CUDA out of memory even at micro batch 1 x {self.cfg.seq_len} tokens: "
                                    f"use a smaller model or --block-size") from None
                b = self._smaller_micro_batch(b)
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:
            agreed = torch.tensor([b], device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            b = int(agreed.item())
        if b != self.micro_batch:
            self._set_micro_batch(b, reason="oom")
        return b

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def val_loss(self):
        """Mean loss over the val batches of all ranks (sum of losses / counted tokens, all-reduced)."""
        if hasattr(self.val_data, "batch_size"):
            self.val_data.batch_size = self.micro_batch  # smaller after an OOM; the val windows stay the same
        self.fwd_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, counted tokens)
        try:
            for x, y in self.val_data.batches():
                x, y = x.to(self.device), y.to(self.device)
                with self.autocast():
                    loss = self.fwd_model(x, y, reduction="sum")[1]
                total[0] += loss.double()
                total[1] += (y != -1).sum()
        finally:
            self.fwd_model.train()
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
        loss_sum, count = total.tolist()
        return loss_sum / max(count, 1.0)

    def evaluate(self):
        """Val loss and every eval hook's metrics; samples printed (rank 0) and saved."""
        out = {}
        if self.val_data is not None:
            out["val_loss"] = self.val_loss()
        for hook in self.eval_hooks:
            extra = dict(hook(self) or {})
            samples = extra.pop("samples", None)
            if samples and self.is_main:
                self._save_samples(samples)
            out.update(extra)
        self.metrics.update(out)
        return out

    def _save_samples(self, samples):
        path = os.path.join(self.cfg.out_dir, "samples.jsonl")
        with open(path, "a") as f:
            for s in samples:
                print(f"  sample> {s!r}")
                f.write(json.dumps({"step": self.step, "text": s}) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def train_state(self):
        return {"data": self.train_data.state_dict(), "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "elapsed_s": self._elapsed(),
                "tokens_seen": self.step * self.cfg.total_batch_size}

    def save_checkpoint(self, path=None, metrics=None):
        """Write the DESIGN.md checkpoint (rank 0 only); returns its path (None on other ranks)."""
        if not self.is_main:
            return None
        path = path or os.path.join(self.cfg.out_dir, CKPT_NAME)
        return write_checkpoint(
            path, kind=self.kind, model_state=self.raw_model.state_dict(), config=self.model_config,
            step=self.step, optimizer=self.optimizer.state_dict(), train_state=self.train_state(),
            rng=capture_rng_state(), args=self.args, metrics=dict(metrics or self.metrics),
            lora=self.raw_model.lora_config.to_dict() if hasattr(self.raw_model, "lora_config") else None,
        )

    def restore(self, ckpt, load_weights=True):
        """Continue from a checkpoint: weights, optimizer, step, data position, RNG, metrics."""
        if load_weights:
            self.raw_model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"the checkpoint's optimizer state does not fit this model: {e}") from None
        self.step = int(ckpt["step"])
        state = ckpt.get("train_state") or {}
        if "data" in state:
            self.train_data.load_state_dict(state["data"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.metrics = dict(ckpt.get("metrics") or {})
        restore_rng_state(ckpt.get("rng"))

    # ------------------------------------------------------------------ logging

    @property
    def _log_path(self):
        return os.path.join(self.cfg.out_dir, self.cfg.log_name)

    def _elapsed(self):
        started = getattr(self, "_t_start", None)
        return self.elapsed_before + (time.time() - started if started else 0.0)

    def _write_log(self, record):
        if not self.is_main:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        with open(self._log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self):
        """On resume: drop log.jsonl and samples.jsonl lines past the checkpoint's step (the interrupted run's)."""
        if not self.is_main:
            return
        for path in (self._log_path, os.path.join(self.cfg.out_dir, "samples.jsonl")):
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            keep = []
            for line in lines:
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            if len(keep) != len(lines):
                with atomic_path(path) as tmp:
                    with open(tmp, "w") as f:
                        f.writelines(keep)

    def _train_record(self, loss, norm, steps, seconds):
        """Sync point: the step's loss (averaged over ranks), grad norm, throughput."""
        if self.dist.enabled:  # each rank holds sum(its token losses) * W / N: sum over ranks, divide by W
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss /= self.dist.world_size
        loss_v, norm_v = float(loss.item()), float(norm.item())
        if not math.isfinite(loss_v):
            raise UserError(f"training diverged: loss is {loss_v} at step {self.step}; lower --lr")
        tokens_per_sec = steps * self.cfg.total_batch_size / max(seconds, 1e-9)
        rec = {"step": self.step, "train_loss": loss_v, "lr": self.lr(self.step - 1), "grad_norm": norm_v,
               "tokens_per_sec": tokens_per_sec}
        if self.peak_flops:
            rec["mfu"] = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return rec

    def _print(self, rec):
        if not self.is_main:
            return
        parts = [f"step {rec['step']}/{self.cfg.max_steps}"]
        if "train_loss" in rec:
            parts += [f"loss {rec['train_loss']:.4f}", f"lr {rec['lr']:.2e}", f"norm {rec['grad_norm']:.3f}",
                      f"{rec['tokens_per_sec'] / 1e3:.1f}k tok/s"]
            if "mfu" in rec:
                parts.append(f"mfu {100 * rec['mfu']:.1f}%")
        for key in sorted(rec):
            if key not in ("step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s", "peak_mem_gib"):
                value = rec[key]
                parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        print(" | ".join(parts), flush=True)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame):
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays whole)
        self._stop_requested = True
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then exiting",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_agreed(self):
        """True when any rank got SIGTERM/SIGINT (a CPU all-reduce over gloo: no GPU sync)."""
        if not self.dist.enabled:
            return self._stop_requested
        if self._control_group is None:
            self._control_group = (torch.distributed.new_group(backend="gloo")
                                   if self.device.type == "cuda" else torch.distributed.group.WORLD)
        flag = torch.tensor([int(self._stop_requested)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._control_group)
        return bool(flag.item())

    # ------------------------------------------------------------------ the loop

    def fit(self):
        """Train to max_steps (or a signal). Logs, evaluates, checkpoints; returns the last metrics."""
        cfg = self.cfg
        if self.dist.enabled:
            self._stop_agreed()  # create the control group on every rank now, in step
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            if self.step > 0:
                self._truncate_log()
            print(f"training {self.raw_model.num_params() / 1e6:.1f}M parameters on {self.dist.world_size} x "
                  f"{self.device.type} ({self.ptdtype}), micro batch {self.micro_batch} x {cfg.seq_len}, "
                  f"accumulation {self.grad_accum}, {cfg.total_batch_size} tokens/step, "
                  f"steps {self.step} -> {cfg.max_steps}" + (", compiled" if cfg.compile else ""), flush=True)
        self._t_start = time.time()
        if self.step >= cfg.max_steps:
            if self.is_main:
                print(f"already at step {self.step} >= --max-steps {cfg.max_steps}: nothing to do")
            self.metrics["stopped"] = False
            return self.metrics
        stopped = False
        with self._signal_handlers():  # from here a SIGTERM / SIGINT means: checkpoint after this step, exit
            try:
                self.fit_micro_batch()
                stopped = self._loop()
            finally:
                self.train_data.close()
        if self.dist.enabled:
            torch.distributed.barrier(group=self._control_group)
        if self.is_main and cfg.plot:
            plot_log(self._log_path, os.path.join(cfg.out_dir, "loss.png"))
        self.metrics["stopped"] = stopped
        return self.metrics

    def _loop(self):
        cfg = self.cfg
        t_last, steps_since = time.time(), 0
        while self.step < cfg.max_steps:
            loss, norm = self.train_step()
            steps_since += 1
            step, last = self.step, self.step == cfg.max_steps
            stop = self._stop_agreed() or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
            do_eval = cfg.eval_interval > 0 and (step % cfg.eval_interval == 0 or last)
            do_ckpt = (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0) or last or stop
            record = {"step": step}
            if step % cfg.log_interval == 0 or do_eval or do_ckpt or step == 1:
                if self.device.type == "cuda":  # time the GPU's work, not the CPU's queueing of it
                    torch.cuda.synchronize(self.device)
                record.update(self._train_record(loss, norm, steps_since, time.time() - t_last))
                steps_since = 0
            if do_eval:
                record.update(self.evaluate())
            if len(record) > 1:
                record["elapsed_s"] = self._elapsed()
                self._print(record)
                self._write_log(record)
            if do_ckpt:
                path = self.save_checkpoint()
                if self.is_main and self.checkpoint_hook is not None:
                    self.checkpoint_hook(self, path, dict(self.metrics))
            if steps_since == 0 or do_ckpt:
                t_last = time.time()  # throughput counts training time only
            if stop:
                if self.is_main:
                    print(f"stopped at step {step}; checkpoint saved in {cfg.out_dir}", file=sys.stderr, flush=True)
                return True
        return False


# ====================================================================== standard eval hooks

def make_hellaswag_hook(path, limit=None, batch_examples=8):
    """HellaSwag acc_norm at each evaluation, spread over ranks, with the eager raw_model."""
    examples = load_examples(path, limit)

    def hook(trainer):
        result = evaluate(trainer.raw_model, examples, trainer.device, trainer.dist.rank, trainer.dist.world_size,
                          batch_examples=batch_examples, autocast_dtype=trainer.ptdtype)
        return {"hellaswag_acc": result["acc_norm"]}

    return hook


def make_sample_hook(prompts, max_new_tokens=48, top_k=50, temperature=1.0, every=None, seed=0):
    """A few continuations (rank 0, eager raw_model with a KV-cache, seeded top-k) at evaluations."""
    def hook(trainer):
        if not trainer.is_main or max_new_tokens <= 0 or trainer.raw_model.config.vocab_size < GPT2_VOCAB:
            return {}  # (a model with a toy vocabulary cannot read GPT-2 token ids)
        if every and trainer.step % every and trainer.step != trainer.cfg.max_steps:
            return {}
        return {"samples": [
            prompt + sample_text(trainer.raw_model, prompt, max_new_tokens, temperature, top_k,
                                 seed=seed + 1000 * trainer.step + i, device=trainer.device,
                                 autocast_dtype=trainer.ptdtype)
            for i, prompt in enumerate(prompts)
        ]}

    return hook


def plot_log(log_path, png_path):
    """Loss curves (train, val) and HellaSwag from log.jsonl, as a PNG (written atomically)."""
    if not os.path.isfile(log_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(log_path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in ("train_loss", "val_loss", "hellaswag_acc")}
    if not series["train_loss"] and not series["val_loss"]:
        return None
    fig, ax = plt.subplots(1, 2 if series["hellaswag_acc"] else 1, figsize=(11 if series["hellaswag_acc"] else 6, 4),
                           squeeze=False)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            ax[0][0].plot(steps, values, style, label=key.replace("_", " "), markersize=3)
    ax[0][0].set_xlabel("step")
    ax[0][0].set_ylabel("loss")
    ax[0][0].legend()
    ax[0][0].grid(alpha=0.3)
    if series["hellaswag_acc"]:
        steps, values = zip(*series["hellaswag_acc"])
        ax[0][1].plot(steps, values, "o-", color="tab:green", markersize=3)
        ax[0][1].set_xlabel("step")
        ax[0][1].set_ylabel("HellaSwag acc_norm")
        ax[0][1].grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return png_path


# ====================================================================== CLI

DEFAULT_PROMPTS = ("Hello, I'm a language model,", "The history of the city began")


def add_system_args(parser, kernels=True):
    """The "system" flags shared by train_gpt2.py and finetune_dolly.py (device, dtype, compile, prefetch,
    OOM handling); kernels=False leaves out --sdpa-backend and --loss-chunk."""
    s = parser.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun picks cuda:LOCAL_RANK)")
    s.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on CUDA, else float32) | bfloat16 | float32")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    s.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    s.add_argument("--compile-fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    s.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    s.add_argument("--prefetch", type=int, default=4, help="batches prefetched in a thread (0: none)")
    if kernels:
        s.add_argument("--sdpa-backend", default="auto", choices=["auto", *SDPA_BACKENDS],
                       help="attention kernel of the training step (auto: PyTorch picks)")
        s.add_argument("--loss-chunk", type=int, default=0,
                       help="tokens per chunk of the LM-head loss (model.LinearCrossEntropy: the (B*T, V) logits never "
                            "exist whole); 0: plain cross-entropy over full logits")
    s.add_argument("--no-auto-shrink", action="store_true", help="on CUDA OOM fail instead of halving the micro batch")


def build_parser():
    p = argparse.ArgumentParser(
        description="Pretrain GPT-2 on token shards (python or torchrun; DDP, bf16, exact resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument_group("data and output")
    a.add_argument("--data-dir", default="data/fineweb", help="folder of *_train_*.bin / *_val_*.bin shards")
    a.add_argument("--data-prefix", default=None, help="shard prefix, when the folder holds several")
    a.add_argument("--out-dir", default="out/pretrain", help="checkpoint, log.jsonl, loss.png, samples.jsonl")
    a.add_argument("--init-from", default="scratch",
                   help="scratch | resume (OUT_DIR/ckpt.pt: weights, optimizer, step, data, RNG) | a checkpoint "
                        "path (weights only) | gpt2, gpt2-medium, gpt2-large, gpt2-xl | a local HF GPT-2 folder")
    m = p.add_argument_group("model (scratch)")
    m.add_argument("--n-layer", type=int, default=12)
    m.add_argument("--n-head", type=int, default=12)
    m.add_argument("--n-embd", type=int, default=768)
    m.add_argument("--block-size", type=int, default=1024, help="sequence length of training windows")
    m.add_argument("--vocab-size", type=int, default=50304, help="embedding rows (50257 padded for speed)")
    m.add_argument("--dropout", type=float, default=0.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=64, help="micro batch: sequences per GPU per micro-step")
    o.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step (all GPUs); gradient accumulation fills the gap")
    o.add_argument("--max-steps", type=int, default=19073)
    o.add_argument("--warmup-steps", type=int, default=715)
    o.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=None, help="final learning rate (None: --lr / 10)")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=1337, help="model init and data order")
    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--eval-interval", type=int, default=250, help="steps between evaluations (0: none)")
    e.add_argument("--eval-steps", type=int, default=20,
                   help="val batches of --batch-size sequences per evaluation (spread over the GPUs)")
    e.add_argument("--hellaswag", default=None, metavar="FILE", help="HellaSwag .jsonl[.xz] to score at evaluations")
    e.add_argument("--hellaswag-limit", type=int, default=None, help="score only the first N HellaSwag examples")
    e.add_argument("--sample-interval", type=int, default=None,
                   help="samples at evaluations whose step is a multiple of this (default: every evaluation)")
    e.add_argument("--sample-tokens", type=int, default=48, help="tokens per sample (0: no samples)")
    e.add_argument("--sample-prompt", action="append", default=None, help="sample prompt (repeatable)")
    e.add_argument("--ckpt-interval", type=int, default=1000, help="steps between checkpoints (always at the end)")
    e.add_argument("--log-interval", type=int, default=10, help="steps between log lines (the only host syncs)")
    e.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, leaving the LR schedule of --max-steps intact "
                        "(job time limits; continue with --init-from resume)")
    e.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT_DIR/loss.png (loss and HellaSwag curves) at the end")
    add_system_args(p)
    return p


def check_args(args):
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "total_batch_size", "max_steps",
                 "log_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_interval", "eval_steps", "ckpt_interval", "prefetch"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")


def warn_resume_differences(args, ckpt):
    old = ckpt.get("args") or {}
    keys = ("seed", "total_batch_size", "block_size", "lr", "min_lr", "max_steps", "warmup_steps", "weight_decay")
    changed = [f"{k} {old[k]} -> {getattr(args, k)}" for k in keys if k in old and old[k] != getattr(args, k)]
    if changed:
        print(f"warning: resuming with different settings ({'; '.join(changed)}): the run will not match "
              f"an uninterrupted one", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    dist = setup_distributed(args.device)
    try:
        return _run(args, dist)
    finally:
        teardown_distributed(dist)


def _run(args, dist):
    device = dist.device
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    model, ckpt = build_model_for_init(args.init_from, args.out_dir, config, kind="pretrain")
    if ckpt is not None:
        warn_resume_differences(args, ckpt) if dist.is_main else None
    if args.block_size > model.config.block_size:
        raise UserError(f"--block-size {args.block_size} exceeds the model's block_size {model.config.block_size}")

    train_paths = list_shards(args.data_dir, "train", args.data_prefix)
    train_data = TokenWindows(train_paths, args.block_size, args.batch_size, dist.rank, dist.world_size, args.seed)
    val_data = None
    if args.eval_interval > 0 and args.eval_steps > 0:
        val_paths = list_shards(args.data_dir, "val", args.data_prefix)
        val_data = ValWindows(val_paths, args.block_size, args.batch_size, args.eval_steps * args.batch_size,
                              dist.rank, dist.world_size)
    hooks = []
    if args.hellaswag:
        hooks.append(make_hellaswag_hook(args.hellaswag, args.hellaswag_limit))
    if args.sample_tokens > 0:
        hooks.append(make_sample_hook(args.sample_prompt or list(DEFAULT_PROMPTS), args.sample_tokens,
                                      every=args.sample_interval, seed=args.seed))
    cfg = TrainConfig(
        out_dir=args.out_dir, batch_size=args.batch_size, seq_len=args.block_size,
        total_batch_size=args.total_batch_size, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
        lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
        stop_at_step=args.stop_at_step, device=args.device, dtype=args.dtype, compile=compile_, compile_mode=args.compile_mode,
        compile_fullgraph=args.compile_fullgraph, compile_backend=args.compile_backend, prefetch=args.prefetch,
        loss_chunk=args.loss_chunk, sdpa_backend=args.sdpa_backend,
        auto_shrink_batch=not args.no_auto_shrink, plot=args.plot,
    )
    trainer = Trainer(model, cfg, train_data, val_data, dist=dist, kind="pretrain", eval_hooks=hooks,
                      args=vars(args))
    if ckpt is not None:
        trainer.restore(ckpt, load_weights=False)  # weights came with the model
    return trainer.fit()


if __name__ == "__main__":
    run_cli(main)
