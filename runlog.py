"""A training run's record (rank 0): one console line per log step, log.jsonl, samples, loss.png, wandb.
Every record carries elapsed_s, the run's wall time continued across resumes."""

import json
import os
import sys
import time

from common import atomic_path

HIDDEN = ("step", "elapsed_s", "eta_s", "peak_mem_gib", "epoch")  # in log.jsonl, not on the console line


def duration(seconds):
    """4321.0 -> '1h12m', 75.0 -> '1m15s', 9.5 -> '9.5s'."""
    m, s = divmod(int(seconds), 60)
    return f"{seconds:.1f}s" if seconds < 60 else f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class RunLog:
    def __init__(self, out_dir, max_steps, is_main):
        self.out_dir, self.max_steps, self.is_main = out_dir, max_steps, is_main
        self.path = os.path.join(out_dir, "log.jsonl")
        self.elapsed_before, self.t_start, self.wandb = 0.0, time.time(), None

    def elapsed(self):
        return self.elapsed_before + time.time() - self.t_start

    def begin(self, step, header, wandb=None):
        """The run's folder, its logs cut back to `step` (a resume: later lines go), the header, wandb."""
        self.t_start = time.time()
        if not self.is_main:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        for path in (self.path, os.path.join(self.out_dir, "samples.jsonl")):
            if step > 0 and os.path.isfile(path):
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
                with atomic_path(path) as tmp, open(tmp, "w") as f:
                    f.writelines(keep)
        print(header, flush=True)
        if wandb is not None:
            import wandb as wandb_lib  # optional dependency: only with --wandb

            self.wandb = wandb_lib.init(dir=self.out_dir, **wandb)

    def log(self, record, message=None):
        """One line on stdout (or `message` on stderr), one line of log.jsonl, one wandb row."""
        if not self.is_main:
            return
        record = {**record, "elapsed_s": round(self.elapsed(), 3)}
        if message:
            print(message, file=sys.stderr, flush=True)
        else:
            parts = [f"step {record['step']}/{self.max_steps}"] + [
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k not in HIDDEN]
            parts.append(f"elapsed {duration(record['elapsed_s'])}")
            if "eta_s" in record:
                parts.append(f"eta {duration(record['eta_s'])}")
            print(" | ".join(parts), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def end(self, plot):
        if self.is_main and plot:
            plot_log(self.path, os.path.join(self.out_dir, "loss.png"))
        if self.wandb is not None:
            self.wandb.finish()


def plot_log(log_path, png_path):
    """Loss (train, val) against steps and against wall time, and HellaSwag, from log.jsonl; a PNG (atomic)."""
    from matplotlib.figure import Figure  # only for the plot (no pyplot, no GUI backend); --no-plot never imports it

    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = [k for k in ("train_loss", "val_loss", "hellaswag_acc") if any(k in r for r in rows)]
    if not {"train_loss", "val_loss"} & set(keys):
        return
    panels = [("step", "step", 1), ("elapsed_s", "wall time (min)", 60)]
    fig = Figure(figsize=(14, 4), layout="tight")
    axes = fig.subplots(1, 3 if "hellaswag_acc" in keys else 2, squeeze=False)
    for key in keys:
        for i, (xkey, xlabel, per) in enumerate(panels[:1] if key == "hellaswag_acc" else panels):
            ax = axes[0][2 if key == "hellaswag_acc" else i]
            points = [(r[xkey] / per, r[key]) for r in rows if key in r and xkey in r]
            ax.plot(*zip(*points), "-" if key == "train_loss" else "o-", label=key.replace("_", " "), markersize=3)
            ax.set_xlabel(xlabel)
            ax.legend()
            ax.grid(alpha=0.3)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
