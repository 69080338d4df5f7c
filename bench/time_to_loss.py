"""Time to a target val loss (default: the first AdamW run's final one; docs/design.md has the output):
train_gpt2's own loop once per configuration, same shards, data order and initial weights. One model object
serves every run, so torch.compile compiles once, in an untimed 2-step warm-up.

    python bench/time_to_loss.py --data-dir data/books --out-dir out/ttl --runs adamw:lr=6e-4,muon:muon_lr=0.02
"""

import copy
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import CLIParser, DefaultsFormatter, UserError, run_cli  # noqa: E402
from common import atomic_path  # noqa: E402
from device import setup_distributed  # noqa: E402
from fineweb import list_shards  # noqa: E402
from runlog import duration  # noqa: E402
from train_flags import pretrain_parser  # noqa: E402
from train_gpt2 import TokenWindows, initial_model, run, val_windows  # noqa: E402

DEFAULTS = ["--max-steps", "300", "--total-batch-size", "131072", "--warmup-steps", "30", "--eval-interval", "25",
            "--eval-steps", "8", "--ckpt-interval", "0", "--sample-tokens", "0", "--no-plot", "--overwrite"]


def run_argv(spec, common, out_dir, index):
    """'muon:muon_lr=0.02' -> (label, train_gpt2 argv): the common flags, then the run's own."""
    name, *pairs = spec.strip().split(":")
    folder = f"{index:02d}_" + re.sub(r"[^A-Za-z0-9.-]+", "_", spec.strip())  # 00_muon_muon_lr_0.02: a plain name
    argv = [*DEFAULTS, *common, "--optimizer", name, "--out-dir", os.path.join(out_dir, folder)]
    for pair in pairs:  # flag=value, or a switch: no_compile
        key, eq, value = pair.partition("=")
        argv += [f"--{key.strip().replace('_', '-')}"] + ([value.strip()] if eq else [])
    return spec.strip(), argv


def curve(log_path, tokens_per_step):
    """A run's evaluations [(step, training seconds, wall seconds, val loss)], tokens/s, its last train record."""
    train_s, last, points = 0.0, {"step": 0}, []
    with open(log_path) as f:
        for r in map(json.loads, f):
            if "tokens_per_sec" in r:
                train_s += (r["step"] - last["step"]) * tokens_per_step / r["tokens_per_sec"]
                last = r
            if "val_loss" in r:
                points.append((r["step"], round(train_s, 3), r["elapsed_s"], r["val_loss"]))
    return points, last["step"] * tokens_per_step / max(train_s, 1e-9), last


def plot(results, target, png):
    from matplotlib.figure import Figure  # only here: the plot

    fig = Figure(figsize=(12, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for r in results:
        steps, seconds, _, losses = zip(*r["curve"])
        axes[0].plot(steps, losses, "o-", markersize=3, label=r["label"])
        axes[1].plot(seconds, losses, "o-", markersize=3, label=r["label"])
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel=xlabel, ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def parse_runs(argv):
    """(bench flags, [(label, train_gpt2 args)]): the common flags with each run's overrides, checked."""
    p = CLIParser(description="Steps, tokens and seconds to a target val loss, per optimizer / LR (train_gpt2's "
                  "loop; other train_gpt2.py flags pass through).", formatter_class=DefaultsFormatter)
    p.add_argument("--runs", default="adamw,muon", help="comma-separated OPTIMIZER[:flag=value...] configurations")
    p.add_argument("--target", type=float, help="val loss to reach (default: the first AdamW run's final)")
    p.add_argument("--out-dir", default="out/time_to_loss", help="the runs' logs and time_to_loss.png")
    p.add_argument("--data-dir", default="data/fineweb", help="token shards (fineweb.py output)")
    args, common = p.parse_known_args(argv)
    specs = [s for s in args.runs.split(",") if s.strip()]
    if not specs:
        raise UserError("--runs names no configuration")
    runs = [(label, pretrain_parser().parse_args(a)) for label, a in (
        run_argv(s, ["--data-dir", args.data_dir, *common], args.out_dir, i) for i, s in enumerate(specs))]
    if not all(a.eval_interval for _, a in runs):
        raise UserError("--eval-interval 0: the runs need val losses")
    return args, runs


def report(args, runs, device):
    """Each run's curve, the target, steps / tokens / seconds to it; the table, the PNG, the JSON line."""
    results = []
    for label, a in runs:
        points, tps, last = curve(os.path.join(a.out_dir, "log.jsonl"), a.total_batch_size)
        results.append({"label": label, "optimizer": a.optimizer, "lr": a.lr, "final_val_loss": points[-1][3],
                        "muon_lr": a.muon_lr if a.optimizer == "muon" else None, "tokens_per_sec": round(tps),
                        "mfu": last.get("mfu"), "peak_mem_gib": last.get("peak_mem_gib"), "curve": points})
    base = next((r for r in results if r["optimizer"] == "adamw"), results[0])
    target = args.target if args.target is not None else base["final_val_loss"]
    for r, (_, a) in zip(results, runs):
        hit = next((pt for pt in r["curve"] if pt[3] <= target), (None,) * 4)
        r.update(steps=hit[0], tokens=hit[0] and hit[0] * a.total_batch_size, train_s=hit[1], wall_s=hit[2])
    for r in results:
        r["time_ratio"] = round(r["train_s"] / base["train_s"], 3) if r["train_s"] and base["train_s"] else None
    print(f"\ntarget val loss {target:.4f} (first evaluation at or below it; "
          f"ratio: training seconds / {base['label']}'s)")
    print(f"{'run':<36} {'final val':>9} {'steps':>6} {'tokens':>12} {'train s':>8} {'wall':>8} {'ratio':>6} "
          f"{'tokens/s':>10}")
    for r in results:
        hit = r["steps"] is not None
        print(f"{r['label'][:36]:<36} {r['final_val_loss']:>9.4f} {r['steps'] if hit else '-':>6} "
              f"{r['tokens'] if hit else 0:>12,} {r['train_s'] if hit else 0:>8.1f} "
              f"{duration(r['wall_s']) if hit else '-':>8} {r['time_ratio'] or '-':>6} {r['tokens_per_sec']:>10,}")
    plot(results, target, os.path.join(args.out_dir, "time_to_loss.png"))
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
               "torch": torch.__version__, "data_dir": args.data_dir, "target": target, "runs": results}
    print(json.dumps(summary))
    return summary


def main(argv=None):
    args, runs = parse_runs(argv)
    first, warmup = runs[0][1], []
    dist = setup_distributed(first.device)
    if dist.device.type == "cuda" if first.compile is None else first.compile:  # compile the graphs once, untimed
        warm = copy.copy(first)
        warm.max_steps, warm.out_dir, warm.eval_interval = 2, os.path.join(args.out_dir, "warmup"), 2
        warmup = [("warmup", warm)]
    model = initial_model(first, None)  # one model object for every run (compiled graphs are reused), same weights
    init = copy.deepcopy(model.state_dict())
    val = val_windows(list_shards(first.data_dir, "val"), first.block_size, first.batch_size,
                      first.eval_steps * first.batch_size)
    for _, a in warmup + runs:
        model.load_state_dict(init)  # in place: the same parameters, so the compiled graphs still fit
        torch.manual_seed(a.seed)
        train = TokenWindows(list_shards(a.data_dir, "train"), a.block_size,
                             a.total_batch_size // a.block_size, seed=a.seed)
        run(a, dist, None, model, train, val, "pretrain")
        if os.path.exists(os.path.join(a.out_dir, "ckpt.pt")):
            os.remove(os.path.join(a.out_dir, "ckpt.pt"))  # a measurement: its weights are not kept
    return report(args, runs, dist.device)


if __name__ == "__main__":
    run_cli(main)
