"""Pretrain GPT-2 on token shards (fineweb.py output): one process, or DDP under torchrun (README, step 2).
fit() is the loop, read top to bottom (finetune_dolly.py runs it too); a step's rows are a function of its number.
"""

import contextlib
import functools
import json
import math
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from cli import help_requested, run_cli
from train_flags import MUON_LR_RATIO, pretrain_parser

if __name__ == "__main__" and help_requested():
    pretrain_parser().parse_args()  # --help answers here, before the ~2 s import of torch below

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import (CKPT_NAME, SHAPE_KEYS, CheckpointError, build_model, capture_rng_state,  # noqa: E402
                        load_checkpoint, load_model, model_from_checkpoint, restore_rng_state, save_checkpoint)
from common import UserError, clean_stale_temps  # noqa: E402
from device import autocast, pick_dtype, setup_distributed, teardown_distributed  # noqa: E402
from fineweb import list_shards, read_shard  # noqa: E402
from hellaswag import evaluate as hellaswag_accuracy, load_examples  # noqa: E402
from inference import Engine, generate_text  # noqa: E402
from lora import merged_state_dict  # noqa: E402
from optim import Optimizer  # noqa: E402
from runlog import RunLog  # noqa: E402
from tokenizer import N_VOCAB  # noqa: E402

LAST_NAME = "last.pt"  # fine-tuning (keep_best): the resumable state; ckpt.pt holds the best weights
RUN_FILES = (CKPT_NAME, LAST_NAME, "log.jsonl", "samples.jsonl", "loss.png")
RESUME_FIXED = ("init_from", "out_dir", "overwrite", "stop_at_step", "compile")  # never taken from the checkpoint
DEFAULT_PROMPTS = ("Hello, I'm a language model,", "The history of the city began")

# bf16 dense tensor-core peak FLOP/s by GPU name (first match wins; no sparsity). Unknown -> no MFU.
PEAK_BF16_FLOPS = [
    (r"h100.*(pcie)", 756e12), (r"h100.*nvl", 835e12), (r"h800.*pcie", 756e12),
    (r"\bh(100|800)\b", 989e12),  # SXM / HBM3
    (r"\bg?h200\b", 989e12), (r"\bb200\b", 2250e12), (r"\bgb200\b", 2500e12), (r"\ba(100|800)\b", 312e12),
    (r"\ba10\b", 125e12), (r"\bl40s\b", 362e12), (r"\bl40\b", 181e12), (r"\bl4\b", 121e12),
    (r"rtx 6000 ada", 364e12), (r"\b4090\b", 165e12), (r"\b3090\b", 71e12),
]


def peak_flops_for_name(name):
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, name.lower())), None)


def lr_factor(a, step):
    """Every group's peak LR times this: linear warmup, then cosine decay to --min-lr / --lr at --max-steps."""
    if step < a.warmup_steps:
        return (step + 1) / a.warmup_steps
    ratio, floor = min(1.0, (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)), a.min_lr / a.lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - floor)


class TokenWindows:
    """Training rows from token shards, read as one concatenated, memory-mapped stream. Window i is tokens
    [i*T, i*T + T + 1) (across shard boundaries: no token is dropped). Epoch e visits every window in the order
    np.random.default_rng([seed, e]).permutation, epochs following as one endless sequence; step s takes the
    next `rows` windows and rank r gets rows r, r + W, ... of them."""

    def __init__(self, paths, seq_len, rows, rank=0, world_size=1, seed=0):
        self.shards = [read_shard(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,) stream offsets
        self.n_windows = (int(self.starts[-1]) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the shards hold {self.starts[-1]} tokens: too few for one sequence of {seq_len} + 1")
        self.seq_len, self.rows, self.rank, self.world_size, self.seed = seq_len, rows, rank, world_size, seed
        self.steps_per_epoch = self.n_windows / rows
        self.signature = {"n_windows": self.n_windows, "seq_len": seq_len}  # a resume needs the same data

    def tokens(self, start, length):
        out = np.empty(length, dtype=np.int64)
        filled, shard = 0, int(np.searchsorted(self.starts, start, side="right") - 1)
        while filled < length:
            piece = self.shards[shard][start + filled - int(self.starts[shard]):][:length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    @functools.lru_cache(maxsize=2)  # a step may span two epochs
    def order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def window(self, g):  # row g of the endless sequence of epochs: T + 1 tokens
        epoch, i = divmod(g, self.n_windows)
        return self.tokens(int(self.order(epoch)[i]) * self.seq_len, self.seq_len + 1)

    def batch(self, step):
        """This rank's rows of `step`: x, y (rows / world_size, T) int64 CPU tensors."""
        first = step * self.rows
        rows = torch.from_numpy(np.stack([self.window(g) for g in range(first + self.rank, first + self.rows,
                                                                         self.world_size)]))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def val_windows(paths, seq_len, batch_size, max_windows, rank=0, world_size=1):
    """The first max_windows windows of the val shards, this rank's share (windows r, r + W, ...), as
    (x, y) batches of one shape: rows past the end have targets -1, so the val loss is the same for any W."""
    stream = TokenWindows(paths, seq_len, 1)
    mine = range(rank, min(max_windows, stream.n_windows), world_size)
    rows = np.zeros((-(-len(mine) // batch_size) * batch_size, seq_len + 1), dtype=np.int64)  # whole batches
    for k, w in enumerate(mine):
        rows[k] = stream.tokens(w * seq_len, seq_len + 1)
    x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    y[len(mine):] = -1
    return list(zip(x.split(batch_size), y.split(batch_size)))


def fit(t):
    """Train Trainer t to --max-steps or a signal / --stop-at-step. Returns the metrics (val loss, best, stopped)."""
    a, start = t.args, t.step
    t.begin()
    t_last, timed_steps, timed_tokens, loss = time.time(), 0, 0, None
    with t.stopper.installed():  # from here SIGTERM / SIGINT mean: checkpoint after this step, exit
        while True:
            step = t.step
            last = step >= a.max_steps
            stop = step > start and (t.stopper.agreed() or (a.stop_at_step is not None and step >= a.stop_at_step))
            eval_due = a.eval_interval > 0 and (step % a.eval_interval == 0 or last) and (step > start or start == 0)
            record = {"step": step}

            # ---- log: the steps since the last log line (the only host sync)
            if loss is not None and (step % a.log_interval == 0 or last or stop or eval_due):
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)  # time the GPU's work, not the CPU's queueing
                record.update(t.train_record(loss, norm, timed_steps, timed_tokens, time.time() - t_last))
                timed_steps, timed_tokens = 0, 0

            # ---- eval: val loss, HellaSwag, samples; keep_best saves a new best as ckpt.pt
            if eval_due:
                record.update(t.evaluate())
            if len(record) > 1:
                t.runlog.log(record)

            # ---- checkpoint
            if step > start and (last or stop or (a.ckpt_interval > 0 and step % a.ckpt_interval == 0)):
                t.save(t.ckpt_path)
                if t.keep_best and last and "best_step" not in t.metrics:  # no val loss: the final model
                    t.metrics["best_step"] = step
                    t.save(os.path.join(a.out_dir, CKPT_NAME), best=True)
            if last or stop:
                break
            if timed_steps == 0:
                t_last = time.time()  # throughput counts training time only

            # ---- step
            loss, norm, tokens = t.train_step()
            timed_steps, timed_tokens = timed_steps + 1, timed_tokens + tokens
    t.end(stopped=stop)
    return t.metrics


class Trainer:
    """A run of either script. train_data: .batch(step) -> this rank's CPU int64 (x, y), y = -1 where no loss is
    wanted; .rows (per step, all ranks), .seq_len, .steps_per_epoch, .signature (checked at resume). kind "sft"
    keeps the best: ckpt.pt holds the weights of the best val loss, last.pt the resumable state."""

    def __init__(self, model, args, train_data, val_batches=(), dist=None, kind="pretrain", prompts=()):
        self.args, self.kind, self.keep_best = args, kind, kind == "sft"
        self.hellaswag = load_examples(args.hellaswag, args.hellaswag_limit) if args.hellaswag else None
        self.dist = dist or setup_distributed(args.device)
        self.device = self.dist.device
        self.ptdtype = pick_dtype(args.dtype, self.device)
        args.compile = self.device.type == "cuda" if args.compile is None else args.compile
        args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 matmuls left
        if train_data.seq_len > (block := model.config.block_size):
            raise UserError(f"--block-size {train_data.seq_len} exceeds the model's block size {block}")
        self.raw_model = model.to(self.device).train()  # HellaSwag and samples run it eagerly
        self.fwd_model = torch.compile(self.raw_model) if args.compile else self.raw_model  # train step, val loss
        self.model = self.fwd_model if not self.dist.enabled else torch.nn.parallel.DistributedDataParallel(
            self.fwd_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        args.muon_lr = args.muon_lr or args.lr * MUON_LR_RATIO
        self.optimizer = Optimizer(self.raw_model, args, self.device.type)
        self.train_data, self.val_batches = train_data, val_batches
        self.prompts = prompts if model.config.vocab_size >= N_VOCAB else ()  # a toy vocabulary cannot read GPT-2 ids
        self.per_rank, self.micro = train_data.rows // self.dist.world_size, args.batch_size
        if train_data.rows % (self.micro * self.dist.world_size):
            raise UserError(f"a step of {train_data.rows} sequences does not split into micro-batches of --batch-size "
                            f"{self.micro} on {self.dist.world_size} process(es)")
        self.step, self.metrics = 0, {}
        self.ckpt_path = os.path.join(args.out_dir, LAST_NAME if self.keep_best else CKPT_NAME)
        self.runlog, self.stopper = RunLog(args.out_dir, args.max_steps, self.dist.is_main), StopSignal(self.dist)
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        self.peak_flops = peak_flops_for_name(gpu)  # None for a device not in the table: no MFU
        self.flops_per_token = self.raw_model.flops_per_token(train_data.seq_len)
        self.pool, self.ahead = ThreadPoolExecutor(1, thread_name_prefix="prefetch"), {}  # ahead: step -> Future

    def train_step(self):
        """One optimizer step on this rank's rows -> (loss, grad norm) device tensors, tokens (all ranks)."""
        x, y = self.fetch(self.step)
        while True:
            try:
                loss = self.forward_backward(x, y)
                break
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad()
                self.shrink_micro_batch()
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.args.grad_clip or float("inf"))
        self.optimizer.step(lr_factor(self.args, self.step))
        self.optimizer.zero_grad()
        self.step += 1
        return loss, norm, x.numel() * self.dist.world_size

    def forward_backward(self, x, y):
        """Accumulate the gradients of sum(token losses) / (targets counted over the step and all ranks)."""
        count = int((y != -1).sum())  # CPU tensors: no device sync
        scale = 1.0 / max(count, 1)
        if self.dist.enabled:  # all ranks' count, all-reduced in stream order (the host does not wait)
            total = torch.full((), float(count), device=self.device)  # a fill kernel: no host-to-device copy
            torch.distributed.all_reduce(total)
            scale = self.dist.world_size / total.clamp_min(1.0)  # DDP averages gradients over ranks: undo its 1/W
        micro_batches = list(zip(x.split(self.micro), y.split(self.micro)))
        loss_sum = torch.zeros((), device=self.device)
        for i, (xm, ym) in enumerate(micro_batches):
            xm, ym = xm.to(self.device, non_blocking=True), ym.to(self.device, non_blocking=True)  # (b, T)
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                with autocast(self.device, self.ptdtype):
                    loss = self.model(xm, ym, reduction="sum")[1] * scale  # logits are freed right here
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum  # this rank's share x W: the mean over ranks is the step's loss

    def shrink_micro_batch(self):
        """CUDA OOM: halve the micro-batch (to a divisor of this rank's rows), so the same step can run again."""
        torch.cuda.empty_cache()
        if self.dist.enabled or self.micro == 1:
            raise UserError(f"CUDA out of memory at micro batch {self.micro} x {self.train_data.seq_len} tokens: "
                            f"lower --batch-size" + (" or --block-size" if self.micro == 1 else ""))
        old, self.micro = self.micro, max(d for d in range(1, self.micro // 2 + 1) if self.per_rank % d == 0)
        self.runlog.log({"step": self.step, "event": "oom", "micro_batch": self.micro},
                        f"CUDA out of memory: micro batch {old} -> {self.micro}, accumulation "
                        f"{self.per_rank // self.micro} (the same tokens per step)")

    def fetch(self, step):
        """This rank's rows of `step`, loaded --prefetch steps ahead in a thread (pinned on CUDA)."""
        for s in range(step, step + max(1, self.args.prefetch)):  # --prefetch 0: this step only
            if s not in self.ahead:
                self.ahead[s] = self.pool.submit(self.load, s)
        return self.ahead.pop(step).result()

    def load(self, step):
        x, y = self.train_data.batch(step)
        return (x.pin_memory(), y.pin_memory()) if self.device.type == "cuda" else (x, y)

    @torch.no_grad()
    def evaluate(self):
        """Val loss, HellaSwag acc_norm and samples (rank 0) of the current weights; keep_best saves a new best."""
        out, a = {}, self.args
        self.raw_model.eval()
        if self.val_batches:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, counted targets)
            for x, y in self.val_batches:
                for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
                    xm, ym = xm.to(self.device), ym.to(self.device)
                    with autocast(self.device, self.ptdtype):
                        total[0] += self.fwd_model(xm, ym, reduction="sum")[1].double()
                    total[1] += (ym != -1).sum()
            if self.dist.enabled:
                torch.distributed.all_reduce(total)
            out["val_loss"] = total[0].item() / max(total[1].item(), 1.0)
        if self.hellaswag:
            out["hellaswag_acc"] = hellaswag_accuracy(self.raw_model, self.hellaswag, self.device, self.dist.rank,
                                                      self.dist.world_size, autocast_dtype=self.ptdtype)["acc_norm"]
        if self.prompts and a.sample_tokens > 0 and self.dist.is_main:
            write_samples(self.raw_model, self.prompts, a, self.step)
        self.raw_model.train()
        self.metrics.update(out)
        if self.keep_best and "val_loss" in out and self.step > 0:  # step 0, the initial model, is no candidate
            if out["val_loss"] < self.metrics.get("best_val_loss", float("inf")):
                self.metrics.update(best_val_loss=out["val_loss"], best_step=self.step)
                self.save(os.path.join(a.out_dir, CKPT_NAME), best=True)
            out["best_val_loss"] = self.metrics.get("best_val_loss")
        return {k: v for k, v in out.items() if v is not None}

    def save(self, path, best=False):
        """Our checkpoint (rank 0). best: inference weights only (LoRA merged), no optimizer or RNG state."""
        if not self.dist.is_main:
            return
        raw = self.raw_model
        lora = getattr(raw, "lora_config", None)
        save_checkpoint(
            path, kind=self.kind, model_state=merged_state_dict(raw) if best and lora else raw.state_dict(),
            config=raw.config.to_dict(), step=self.step, optimizer=None if best else self.optimizer.state_dict(),
            train_state={"data": self.train_data.signature, "elapsed_s": self.runlog.elapsed()},
            rng=None if best else capture_rng_state(), args=vars(self.args), metrics=self.metrics,
            lora=lora.to_dict() if lora and not best else None)

    def restore(self, ckpt):
        """--init-from resume: optimizer, step, RNG, metrics and wall time (the weights came with the model)."""
        state = ckpt.get("train_state") or {}
        if state.get("data") != self.train_data.signature:
            raise UserError(f"the training data changed since the checkpoint ({state.get('data')} -> "
                            f"{self.train_data.signature}): resume with the same data and --block-size")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this model: {e}") from None
        self.step, self.metrics = int(ckpt["step"]), dict(ckpt.get("metrics") or {})
        self.runlog.elapsed_before = float(state.get("elapsed_s", 0.0))
        restore_rng_state(ckpt["rng"])

    def begin(self):
        a = self.args
        header = (f"training {self.raw_model.num_params() / 1e6:.1f}M parameters on {self.dist.world_size} x "
                  f"{self.device.type} ({self.ptdtype}), micro batch {self.micro} x {self.train_data.seq_len}, "
                  f"{self.train_data.rows} sequences a step, steps {self.step} -> {a.max_steps}, "
                  f"{self.optimizer.describe()}" + (", compiled" if a.compile else ""))
        wandb = dict(project=a.wandb_project, name=a.wandb_run, config=vars(a)) if a.wandb else None
        self.runlog.begin(self.step, header, wandb)

    def end(self, stopped):
        self.pool.shutdown(cancel_futures=True)
        if self.dist.enabled:
            torch.distributed.barrier(group=self.stopper.group)
        self.metrics["stopped"] = stopped
        if stopped and self.dist.is_main:
            print(f"stopped at step {self.step}; checkpoint saved in {self.args.out_dir}", file=sys.stderr, flush=True)
        self.runlog.end(self.args.plot)

    def train_record(self, loss, norm, steps, tokens, seconds):
        """The last step's loss (mean over ranks), grad norm, LR; throughput and time left since the last log line."""
        if self.dist.enabled:  # each rank holds sum(its token losses) x W / N: sum over ranks, divide by W
            torch.distributed.all_reduce(loss)
            loss /= self.dist.world_size
        loss_v, a = float(loss.item()), self.args
        if not math.isfinite(loss_v):
            raise UserError(f"training diverged: loss is {loss_v} at step {self.step}; lower --lr")
        peak = a.lr if self.optimizer.adamw else a.muon_lr  # AdamW's LR; Muon's where it trains alone (LoRA)
        rec = {"train_loss": loss_v, "lr": peak * lr_factor(a, self.step - 1), "grad_norm": float(norm.item()),
               "tokens_per_sec": tokens / max(seconds, 1e-9),
               "epoch": round(self.step / self.train_data.steps_per_epoch, 3),
               "eta_s": round((a.max_steps - self.step) * seconds / max(steps, 1), 1)}
        if self.peak_flops:
            rec["mfu"] = rec["tokens_per_sec"] * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return rec


def write_samples(model, prompts, a, step):
    """Continue each prompt (inference.generate_text, seeded; the training RNG is untouched); print and save."""
    # eager: a few short samples never repay capturing CUDA graphs, and the graphs' memory would stay
    engine = Engine(model, max_batch=1, graphs=False)
    with open(os.path.join(a.out_dir, "samples.jsonl"), "a") as f:
        for i, prompt in enumerate(prompts):
            text = generate_text(engine, prompt, max_new_tokens=a.sample_tokens, raw=True,
                                 temperature=a.sample_temperature, top_k=50, seed=a.seed + 1000 * step + i)["text"]
            print(f"  sample> {prompt[-40:] + text!r}", flush=True)
            f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")


class StopSignal:
    """SIGTERM / SIGINT: checkpoint after this step, then exit; under DDP every rank stops at the same step."""

    def __init__(self, dist):  # under DDP: every rank, in step (new_group is collective)
        self.dist, self.requested, self.group = dist, False, torch.distributed.group.WORLD if dist.enabled else None
        if dist.enabled and dist.device.type == "cuda":
            self.group = torch.distributed.new_group(backend="gloo")  # agreed()'s CPU all-reduce: no GPU sync

    def on_signal(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays whole)
        self.requested = True
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def agreed(self):
        """True when any rank got SIGTERM / SIGINT (a CPU all-reduce over gloo: no GPU sync)."""
        if not self.dist.enabled:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def parse_args(parser, argv, kind):
    """-> (args, the checkpoint to resume or None); with --init-from resume, flags not given again are the run's."""
    args = parser.parse_args(argv)
    if args.init_from != "resume":
        return args, None
    path = os.path.join(args.out_dir, LAST_NAME if kind == "sft" else CKPT_NAME)
    if not os.path.isfile(path):
        script = "train_gpt2.py" if kind == "pretrain" else "finetune_dolly.py"
        raise UserError(f"--init-from resume: no checkpoint at {path} (--out-dir, default "
                        f"{parser.get_default('out_dir')}): start the run with python {script} --out-dir "
                        f"{args.out_dir}")
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != kind:
        raise UserError(f"--init-from resume: {path} is a {ckpt['kind']!r} checkpoint, this run trains {kind!r}")
    known = {action.dest for action in parser._actions}
    saved = {"optimizer": "adamw", **ckpt["args"]}  # runs saved before --optimizer existed trained with AdamW
    parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in RESUME_FIXED})
    return parser.parse_args(argv), ckpt


def initial_model(args, ckpt):
    """The model a run starts from (torch seeded first): the resumed one, a new GPT of the model flags, or weights."""
    torch.manual_seed(args.seed)
    if ckpt is not None:
        return model_from_checkpoint(ckpt, f"the checkpoint in {args.out_dir}")
    if args.init_from == "scratch":
        shape = {k: vars(args)[k] for k in SHAPE_KEYS}
        return build_model({**shape, "dropout": args.dropout or 0.0}, "the model flags")
    return load_model(args.init_from, dropout=args.dropout)[0]


def run(args, dist, ckpt, model, train_data, val_batches, kind, prompts=()):
    """Both scripts' end: the Trainer, OUT_DIR made ready (last: every mistake before leaves it as it was), fit.
    Temp files of killed writes go; a new run refuses an OUT_DIR holding a run unless --overwrite."""
    trainer = Trainer(model, args, train_data, val_batches, dist, kind, prompts)
    if dist.is_main:
        clean_stale_temps(args.out_dir)
    found = [n for n in RUN_FILES if args.init_from != "resume" and os.path.exists(os.path.join(args.out_dir, n))]
    if found and not args.overwrite:
        raise UserError(f"--out-dir {args.out_dir} holds a run ({', '.join(found)}): continue it with --init-from "
                        f"resume, or pass --overwrite to start afresh")
    if dist.enabled:
        torch.distributed.barrier()  # every rank has looked before rank 0 deletes
    if dist.is_main:
        for name in found:
            os.remove(os.path.join(args.out_dir, name))
    if ckpt is not None:
        trainer.restore(ckpt)
    return fit(trainer)


def main(argv=None):
    args, ckpt = parse_args(pretrain_parser(), argv, "pretrain")
    if args.total_batch_size % args.block_size:
        raise UserError(f"--total-batch-size {args.total_batch_size} is not a multiple of --block-size "
                        f"{args.block_size}")
    dist = setup_distributed(args.device)
    try:
        train = TokenWindows(list_shards(args.data_dir, "train"), args.block_size,
                             args.total_batch_size // args.block_size, dist.rank, dist.world_size, args.seed)
        model = initial_model(args, ckpt)
        n_val = args.eval_steps * args.batch_size if args.eval_interval else 0
        val = val_windows(list_shards(args.data_dir, "val"), args.block_size, args.batch_size,
                          n_val, dist.rank, dist.world_size) if n_val else []
        return run(args, dist, ckpt, model, train, val, "pretrain", prompts=args.sample_prompt or DEFAULT_PROMPTS)
    finally:
        teardown_distributed(dist)


if __name__ == "__main__":
    run_cli(main)
