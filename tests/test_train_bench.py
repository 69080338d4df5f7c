"""bench/time_to_loss.py runs train_gpt2's loop once per configuration and reports time to the target (no timing asserted)."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from test_train import shards  # noqa: F401  (the fixture: real tokens)


def test_time_to_loss_smoke_on_cpu(shards, tmp_path):  # noqa: F811
    out = tmp_path / "ttl"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "time_to_loss.py"), "--data-dir", shards, "--out-dir", str(out),
           "--runs", "adamw:lr=3e-3,muon:lr=3e-3:muon_lr=0.02", "--device", "cpu", "--no-compile", "--n-layer", "2",
           "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--total-batch-size", "128",
           "--max-steps", "4", "--warmup-steps", "1", "--eval-interval", "2", "--eval-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    adamw, muon = summary["runs"]
    assert (adamw["optimizer"], muon["optimizer"], muon["muon_lr"]) == ("adamw", "muon", 0.02)
    assert summary["target"] == adamw["final_val_loss"]  # the default target: the AdamW run's final val loss
    assert [p[0] for p in adamw["curve"]] == [p[0] for p in muon["curve"]] == [0, 2, 4]
    assert adamw["curve"][0][3] == muon["curve"][0][3]  # same initial weights, same val data
    assert adamw["steps"] in (2, 4) and adamw["tokens"] == adamw["steps"] * 128 and adamw["time_ratio"] == 1.0
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in summary["runs"])  # CPU: no MFU
    assert (out / "time_to_loss.png").stat().st_size > 1000 and not (out / "00_adamw_lr_3e-3" / "ckpt.pt").exists()
    bad = subprocess.run(cmd[:-2] + ["--optimizer", "sgd"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'sgd'" in bad.stderr
