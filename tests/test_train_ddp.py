"""DDP on CPU (gloo): `torchrun --nproc_per_node=2` equals one process with the same total batch.

Run by pytest, this file launches itself under torchrun (see __main__ at the bottom): each rank
runs train_gpt2.main (pretraining on real token shards, with val loss and HellaSwag spread over
the ranks) and then the Trainer on masked batches (SFT-like: a different number of counted
tokens in every micro-batch), as finetune_dolly.py will.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from conftest import tiny_config  # noqa: E402

PRETRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
            "--total-batch-size", "256", "--device", "cpu", "--no-compile", "--log-interval", "1",
            "--eval-steps", "3", "--eval-interval", "3", "--sample-tokens", "0", "--no-plot", "--warmup-steps", "2",
            "--max-steps", "6", "--ckpt-interval", "0", "--lr", "3e-3", "--seed", "3",
            "--hellaswag", os.path.join(HERE, "data", "hellaswag_val_200.jsonl"), "--hellaswag-limit", "6"]


def pretrain(data_dir, out_dir, optimizer="adamw"):
    import train_gpt2

    return train_gpt2.main(["--data-dir", data_dir, "--out-dir", out_dir, *PRETRAIN, "--optimizer", optimizer,
                            "--muon-lr", "0.02"])


def masked_finetune(out_dir):
    """The Trainer as finetune_dolly.py uses it: its own rows (masked targets), kind "sft" (keeps the best)."""
    from device import setup_distributed, teardown_distributed
    from model import GPT
    from test_train import MaskedRows, make_args
    from train_gpt2 import Trainer, fit

    dist = setup_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(vocab_size=200, block_size=16))
        args = make_args(out_dir, batch_size=2, max_steps=4, lr=1e-2, min_lr=1e-2, eval_interval=0, ckpt_interval=0,
                         log_interval=1, plot=False, optimizer="adamw")  # the tight tolerance below is AdamW's
        fit(Trainer(model, args, MaskedRows(8, 16, dist.rank, dist.world_size), dist=dist, kind="sft"))
    finally:
        teardown_distributed(dist)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(args, timeout, env):
    """Two ranks of args under torchrun -> the CompletedProcess. Its own process group: past the timeout the
    launcher and its workers are killed together (killing the launcher alone leaves the workers running)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1): tiny models gain nothing from threads
    yield
    torch.set_num_threads(before)


def test_two_ranks_equal_one_process(tmp_path):
    from checkpoint import load_checkpoint
    from test_train import book_documents
    from fineweb import write_token_shards

    data = tmp_path / "shards"
    write_token_shards(book_documents(60_000), str(data), prefix="b", shard_size=4000, max_tokens=14000,
                       workers=1, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kind in ("pretrain", "sft", "muon"):  # one launch each: re-initialising a process group in one process is fragile
        proc = torchrun([__file__, kind, str(data), str(tmp_path / "ddp" / kind)], 240, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    pretrain(str(data), str(tmp_path / "one" / "pretrain"))
    pretrain(str(data), str(tmp_path / "one" / "muon"), "muon")
    masked_finetune(str(tmp_path / "one" / "sft"))

    full = ("train_loss", "val_loss", "hellaswag_acc")
    for kind, keys in (("pretrain", full), ("sft", ("train_loss",)), ("muon", full)):
        one, two = read_log(tmp_path / "one" / kind), read_log(tmp_path / "ddp" / kind)
        assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 4
        # Muon orthogonalises in bf16 (torch's Newton-Schulz), which turns the fp32 rounding of a different
        # gradient sum order into ~1e-4 relative differences: its tolerance is 10x looser, still far below a bug's
        tol = 1e-4 if kind == "muon" else 1e-5
        for a, b in zip(one, two):
            for key in keys:
                if key in a or key in b:
                    assert abs(a[key] - b[key]) <= tol, (kind, a["step"], key, a[key], b[key])
            assert ("grad_norm" in a) == ("grad_norm" in b)
            assert a.get("grad_norm", 0) == pytest.approx(b.get("grad_norm", 0), rel=10 * tol)
        name = "last.pt" if kind == "sft" else "ckpt.pt"
        wa = load_checkpoint(tmp_path / "one" / kind / name)["model"]
        wb = load_checkpoint(tmp_path / "ddp" / kind / name)["model"]
        for key in wa:
            a, b = wa[key], wb[key]
            if key.endswith("attn.c_attn.bias"):  # the key bias has an exactly-zero gradient (softmax shift
                c = a.numel() // 3  # invariance): Adam turns its rounding noise into +-lr steps. Skip it.
                a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
            if kind != "muon":
                assert torch.allclose(a, b, atol=tol), (kind, key)
        if kind == "muon":  # per weight, AdamW makes the noise of near-zero gradients +-lr steps: compare the whole
            a, b = (torch.cat([w[k].flatten() for k in sorted(w)]) for w in (wa, wb))
            assert (a - b).norm() <= 1e-3 * a.norm(), (a - b).norm() / a.norm()
    assert load_checkpoint(tmp_path / "ddp" / "sft" / "ckpt.pt")["kind"] == "sft"  # keep_best without val: the final


def test_a_user_error_is_printed_once_under_torchrun(tmp_path):
    proc = torchrun([os.path.join(ROOT, "train_gpt2.py"), "--data-dir", str(tmp_path / "none"), "--device", "cpu"],
                    120, dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
    assert (proc.stdout + proc.stderr).count("error: no train shards in") == 1, proc.stderr[-2000:]
    assert f"python fineweb.py --out-dir {tmp_path / 'none'}" in proc.stderr


if __name__ == "__main__":  # a torchrun worker: argv = pretrain|sft|muon DATA_DIR OUT_DIR
    kind, data_dir, out = sys.argv[1:4]
    masked_finetune(out) if kind == "sft" else pretrain(data_dir, out, "muon" if kind == "muon" else "adamw")
