"""
Training throughput of train_gpt2.py's real step (Trainer.train_step: the same code the training
loop runs, not a copy): tokens/s, MFU and peak memory for each micro batch, with and without
torch.compile. Data: random tokens (default; stated in the output) or real shards (--data-dir).

    python bench/train_throughput.py                           # GPT-2 124M, T=1024, B=16/32/64, compile off/on
    python bench/train_throughput.py --compile on --batch-sizes 64 --data-dir data/books   # real shards
    python bench/train_throughput.py --device cpu --n-layer 2 --n-embd 64 --n-head 2 --block-size 64 \\
        --batch-sizes 2 --steps 2                              # a CPU smoke run

Each configuration runs --warmup steps (compilation happens there), then --steps timed steps of
--total-batch-size tokens each (gradient accumulation as in training), synchronising only at the
ends. A configuration that runs out of memory is reported as OOM and the next one runs. Prints a
table; the last line is JSON.
"""

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import UserError, pick_device, run_cli  # noqa: E402
from model import GPT, GPT2_VOCAB, GPTConfig  # noqa: E402
from fineweb import list_shards  # noqa: E402
from train_gpt2 import Trainer, TokenWindows, build_parser, detect_peak_flops  # noqa: E402


class RandomTokens:
    """Uniform random token ids, a function of the step (a Trainer data source): what the throughput anchors used."""

    def __init__(self, rows, seq_len, vocab=GPT2_VOCAB):
        self.rows, self.seq_len, self.vocab = rows, seq_len, vocab
        self.steps_per_epoch, self.signature = float("inf"), {}

    def batch(self, step):
        rows = torch.randint(0, self.vocab, (self.rows, self.seq_len + 1), generator=torch.Generator().manual_seed(step))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(args, rows):
    if args.data_dir:
        return TokenWindows(list_shards(args.data_dir, "train"), args.block_size, rows, seed=0)
    return RandomTokens(rows, args.block_size, vocab=min(args.vocab_size, GPT2_VOCAB))


def run_config(args, device, compiled, batch_size, total, out_dir):
    """Build a fresh model + Trainer, warm up, time --steps steps. Returns a result row."""
    row = {"compile": compiled, "batch_size": batch_size, "grad_accum": total // (batch_size * args.block_size)}
    free_memory(device)
    trainer = None
    try:
        torch.manual_seed(0)
        config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        flags = build_parser().parse_args(["--out-dir", out_dir, "--device", str(device), "--dtype", args.dtype,
                                           "--batch-size", str(batch_size), "--max-steps", str(10 ** 9),
                                           "--warmup-steps", "10", "--prefetch", str(args.prefetch), "--no-auto-shrink"])
        flags.compile, flags.min_lr = compiled, flags.lr / 10
        trainer = Trainer(GPT(config), flags, make_data(args, total // args.block_size))
        t0 = time.time()
        for _ in range(args.warmup):
            trainer.train_step()
        sync(device)
        row["warmup_s"] = round(time.time() - t0, 2)
        t0 = time.time()
        for _ in range(args.steps):
            loss = trainer.train_step()[0]
        sync(device)
        seconds = time.time() - t0
        row["step_s"] = seconds / args.steps
        row["tokens_per_sec"] = args.steps * total / seconds
        row["loss"] = float(loss.item())
        peak = detect_peak_flops(device)
        row["mfu"] = row["tokens_per_sec"] * trainer.flops_per_token / peak if peak else None
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        if args.profile:
            row["top_kernels"] = profile_steps(trainer, device, args.profile)
    except (torch.OutOfMemoryError, UserError, RuntimeError) as e:
        if not is_oom(e):
            raise
        row["oom"] = True
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    finally:
        if trainer is not None and trainer.pool is not None:
            trainer.pool.shutdown(cancel_futures=True)
        del trainer
        free_memory(device)
    return row


def profile_steps(trainer, device, n_steps):
    """Kernel time breakdown of n_steps training steps (torch.profiler); prints a table, returns the top 10."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            trainer.train_step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    return [{"name": e.key[:80], "share": round(getattr(e, key, 0) / total, 4)} for e in events[:10]]


def print_table(rows, data_desc):
    print(f"\ndata: {data_desc}")
    print(f"{'compile':>8} {'B':>4} {'accum':>5} {'tokens/s':>12} {'step s':>8} {'MFU':>7} {'peak GiB':>9} {'warmup s':>9}")
    for r in rows:
        if r.get("oom"):
            print(f"{str(r['compile']):>8} {r['batch_size']:>4} {r['grad_accum']:>5} {'OOM':>12}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(f"{str(r['compile']):>8} {r['batch_size']:>4} {r['grad_accum']:>5} {r['tokens_per_sec']:>12,.0f} "
              f"{r['step_s']:>8.3f} {mfu:>7} {mem:>9} {r['warmup_s']:>9.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Throughput of train_gpt2's training step (tokens/s, MFU, peak memory).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="autocast dtype (auto: bf16 on CUDA)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--batch-sizes", default="16,32,64", help="micro batches to try, comma-separated")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per step (default: 524288 on CUDA, the GPT-2 recipe; elsewhere the lcm of the B x T)")
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--data-dir", default=None, help="real token shards instead of random tokens")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps per config (kernel table)")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.steps < 1:
        raise UserError("--batch-sizes and --steps must be positive")
    per_micro = [b * args.block_size for b in batch_sizes]
    total = args.total_batch_size
    if total is None:
        recipe = device.type == "cuda" and all(524288 % m == 0 for m in per_micro)
        total = 524288 if recipe else math.lcm(*per_micro)
    if any(total % m for m in per_micro):
        raise UserError(f"--total-batch-size {total} must be a multiple of every batch size x block size")
    compile_opts = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    data_desc = f"real shards from {args.data_dir}" if args.data_dir else "random tokens"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{gpu}, torch {torch.__version__}, GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd}, "
          f"T={args.block_size}, {total} tokens/step, {data_desc}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for compiled in compile_opts:
            for b in batch_sizes:
                row = run_config(args, device, compiled, b, total, out_dir)
                rows.append(row)
                shown = "OOM" if row.get("oom") else f"{row['tokens_per_sec']:,.0f} tokens/s"
                print(f"  compile={compiled} B={b}: {shown}", flush=True)
    print_table(rows, data_desc)
    ok = [r for r in rows if not r.get("oom")]
    best = max(ok, key=lambda r: r["tokens_per_sec"]) if ok else None
    summary = {
        "device": gpu, "torch": torch.__version__, "data": data_desc, "tokens_per_step": total,
        "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size},
        "prefetch": args.prefetch, "steps": args.steps,
        "results": rows,
        "best": None if best is None else {k: best.get(k) for k in ("compile", "batch_size", "tokens_per_sec", "mfu",
                                                                     "peak_mem_gib")},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
