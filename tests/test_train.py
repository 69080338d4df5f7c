"""train_gpt2.py on CPU with a tiny model: learning, exact resume, signals, crash safety, data order, loss."""

import argparse
import functools
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config

import cli
import train_gpt2
from checkpoint import load_checkpoint
from common import UserError
from fineweb import list_shards, write_manifest, write_shard, write_token_shards
from model import GPT
from train_flags import pretrain_parser
from train_gpt2 import TokenWindows, Trainer, fit, lr_factor, peak_flops_for_name, val_windows

BOOKS = os.path.join(ROOT, "demo_data", "books.jsonl.xz")
HELLASWAG = os.path.join(ROOT, "tests", "data", "hellaswag_val_200.jsonl")
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses: tiny models gain nothing from threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (two threads stall each other on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def book_documents(n_chars):
    """The start of a bundled public-domain book, cut into ~2k-character documents."""
    with lzma.open(BOOKS, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:n_chars]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real tokens: a 6k-token val shard and 3 train shards of 6k tokens."""
    out = tmp_path_factory.mktemp("shards")
    write_token_shards(book_documents(100_000), str(out), prefix="books", shard_size=6000, max_tokens=24000,
                       workers=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def periodic_shards(tmp_path_factory):
    """A random 97-token sequence over 128 ids, repeated: learnable from context, cheap with --vocab-size 128."""
    out = tmp_path_factory.mktemp("periodic")
    stream = np.tile(np.random.default_rng(0).integers(0, 128, 97), 40)
    write_manifest(out, [write_shard(out / "p_val_000000.bin", stream[:1000]),
                         write_shard(out / "p_train_000001.bin", stream[1000:2500]),
                         write_shard(out / "p_train_000002.bin", stream[2500:])])
    return str(out)


TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
        "--total-batch-size", "128", "--device", "cpu", "--no-compile", "--log-interval", "1", "--eval-steps", "2",
        "--sample-tokens", "0", "--no-plot", "--warmup-steps", "2", "--seed", "7",
        "--optimizer", "adamw"]  # the LRs these tests pass are AdamW's; the Muon tests say --optimizer muon


def train(data_dir, out_dir, *extra):
    return train_gpt2.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir), *TINY, *map(str, extra)])


def run_cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=120, env=ENV1)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["step"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


# ---------------------------------------------------------------------------------------------- learning

def test_tiny_model_drives_the_loss_down(periodic_shards, tmp_path):
    metrics = train(periodic_shards, tmp_path, "--max-steps", "40", "--lr", "1e-2", "--eval-interval", "20",
                    "--ckpt-interval", "0", "--vocab-size", "128", "--n-embd", "64", "--plot")
    curve = losses(tmp_path)
    assert curve[1] > 4.5  # ln(128) ~ 4.85 at init; ids are uniform, so no unigram shortcut below ~4.8
    assert np.mean([curve[s] for s in range(36, 41)]) < 0.5  # learnt the sequence from context
    assert metrics["val_loss"] < 0.5 and not metrics["stopped"]
    log = read_log(tmp_path)
    assert [r["step"] for r in log if "val_loss" in r] == [0, 20, 40]  # the initial model is evaluated too
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "epoch", "elapsed_s"} <= set(log[-1])
    assert log[-1]["epoch"] > 1  # 40 steps x 4 windows > 89 windows: several epochs
    assert "mfu" not in log[-1]  # CPU: no peak FLOPs, no MFU
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 40 and ckpt["metrics"]["val_loss"] == metrics["val_loss"]
    assert all(not k.startswith(("_orig_mod", "module")) for k in ckpt["model"])
    assert os.path.getsize(os.path.join(tmp_path, "loss.png")) > 1000


def test_tiny_muon_run_drives_the_loss_down(periodic_shards, tmp_path):
    """--optimizer muon: Muon trains exactly the blocks' matrices, AdamW the rest; the loss falls as fast as AdamW's."""
    train(periodic_shards, tmp_path, "--max-steps", "40", "--lr", "1e-2", "--muon-lr", "0.02", "--optimizer", "muon",
          "--eval-interval", "20", "--ckpt-interval", "0", "--vocab-size", "128", "--n-embd", "64")
    curve = losses(tmp_path)
    assert curve[1] > 4.5 and np.mean([curve[s] for s in range(36, 41)]) < 0.5
    opt = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["optimizer"]
    model = GPT(tiny_config(vocab_size=128, n_embd=64, block_size=32))
    names = [n for n, _ in model.named_parameters()]
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")]
    assert len(opt["muon"]["param_groups"][0]["params"]) == len(matrices) == 4 * 2  # c_attn, c_proj, c_fc, c_proj
    assert sum(len(g["params"]) for g in opt["adamw"]["param_groups"]) == len(names) - len(matrices)
    assert opt["muon"]["param_groups"][0]["peak_lr"] == 0.02 and opt["adamw"]["param_groups"][0]["peak_lr"] == 1e-2


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(shards, tmp_path, optimizer):
    """Bitwise: a run stopped at step 6 and resumed (every flag from the checkpoint) equals an uninterrupted one."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--max-steps", "12", "--eval-interval", "6", "--ckpt-interval", "5", "--lr", "3e-3",
              "--dropout", "0.1", "--hellaswag", HELLASWAG, "--hellaswag-limit", "4", "--sample-tokens", "6",
              "--optimizer", optimizer]
    train(shards, straight, *common)
    first = train(shards, split, *common, "--stop-at-step", "6")
    assert first["stopped"] and load_checkpoint(split / "ckpt.pt")["step"] == 6
    with open(split / "log.jsonl", "a") as f:  # as if the run had gone on past its checkpoint, then crashed
        f.write(json.dumps({"step": 7, "train_loss": 1.0}) + "\n")
    train_gpt2.main(["--out-dir", str(split), "--init-from", "resume"])  # every other flag from the checkpoint
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b
    val_a = {r["step"]: (r["val_loss"], r["hellaswag_acc"]) for r in read_log(straight) if "val_loss" in r}
    val_b = {r["step"]: (r["val_loss"], r["hellaswag_acc"]) for r in read_log(split) if "val_loss" in r}
    assert val_a == val_b and sorted(val_a) == [0, 6, 12]
    wa, wb = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert wa["step"] == wb["step"] == 12
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    pairs = [(wa["optimizer"], wb["optimizer"])] if optimizer == "adamw" else [
        (wa["optimizer"][name], wb["optimizer"][name]) for name in ("adamw", "muon")]
    for oa, ob in pairs:
        assert oa["state"] and oa["param_groups"] == ob["param_groups"]
        for key, state in oa["state"].items():
            assert all(torch.equal(v, ob["state"][key][k]) for k, v in state.items())
    samples = [json.loads(line) for line in open(straight / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0, 0, 6, 6, 12, 12] and all(s["text"] for s in samples)
    assert samples == [json.loads(line) for line in open(split / "samples.jsonl")]


def test_init_from_checkpoint_and_hf_folder(shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    metrics = train(shards, tmp_path / "ft", "--init-from", tmp_path / "hf", "--max-steps", "2", "--eval-interval", "2")
    assert load_checkpoint(tmp_path / "ft")["config"]["vocab_size"] == 50257  # the HF model's shape, not the flags'
    again = train(shards, tmp_path / "ft2", "--init-from", tmp_path / "ft" / "ckpt.pt", "--max-steps", "1",
                  "--eval-interval", "1", "--lr", "1e-12", "--min-lr", "1e-12")
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-3)  # weights carried over, step reset
    assert load_checkpoint(tmp_path / "ft2" / "ckpt.pt")["step"] == 1
    with pytest.raises(UserError, match="model not found"):
        train(shards, tmp_path / "x", "--init-from", tmp_path / "missing.pt", "--max-steps", "1")


def test_compiled_training_evaluates_and_samples(shards, tmp_path, monkeypatch):
    """--compile: the step and the val loss run compiled; HellaSwag and samples run on the eager raw_model.

    The aot_eager backend keeps the test quick on CPU; it goes through dynamo and AOTAutograd like inductor.
    """
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    flags = ["--max-steps", "4", "--eval-interval", "2", "--ckpt-interval", "0", "--sample-tokens", "4",
             "--hellaswag", HELLASWAG, "--hellaswag-limit", "4"]
    train(shards, tmp_path / "eager", *flags)
    metrics = train(shards, tmp_path / "compiled", *flags, "--compile")
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "val_loss", "hellaswag_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert metrics["val_loss"] == pytest.approx(compiled[-1]["val_loss"])
    samples = [json.loads(line) for line in open(tmp_path / "compiled" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert not any("_orig_mod" in k for k in load_checkpoint(tmp_path / "compiled" / "ckpt.pt")["model"])


def test_wandb_offline_logs_the_run(shards, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(shards, tmp_path, "--max-steps", "3", "--eval-interval", "3", "--wandb", "--wandb-run", "tiny")
    wandb.teardown()  # what the end of the process does: the wandb service writes out what it holds
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1  # offline: the run's records wait in OUT_DIR/wandb for `wandb sync`
    records = next((tmp_path / "wandb" / runs[0]).glob("run-*.wandb")).read_bytes()  # protobuf records
    logged = [json.dumps(r[k]) for r in read_log(tmp_path) for k in ("train_loss", "val_loss", "grad_norm") if k in r]
    assert len(logged) == 8 and all(value.encode() in records for value in logged)  # every value, as JSON
    assert b"tiny" in records and b"gpt2-instruct" in records and wandb.__version__  # run name, project


# ---------------------------------------------------------------------------------------------- nothing lost

def test_a_new_run_refuses_a_folder_holding_one(shards, tmp_path, capsys):
    out = tmp_path / "run"
    train(shards, out, "--max-steps", "2", "--eval-interval", "0")
    before = load_checkpoint(out / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(train_gpt2.main, ["--data-dir", shards, "--out-dir", str(out), *TINY, "--max-steps", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "holds a run (ckpt.pt, log.jsonl)" in err
    assert load_checkpoint(out / "ckpt.pt")["step"] == before["step"] == 2 and len(read_log(out)) == 2
    (out / ".ckpt.pt.k2j4_x9z.tmp").write_bytes(b"a killed write")  # what atomic_path leaves when killed
    train(shards, out, "--max-steps", "3", "--eval-interval", "0", "--overwrite")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]  # the old log went with --overwrite
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


def test_resume_without_checkpoint_is_clear(shards, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(shards, tmp_path, "--max-steps", "2", "--init-from", "resume")


def test_corrupt_shard_is_a_clear_error(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in list_shards(shards, "val") + list_shards(shards, "train") + [os.path.join(shards, "manifest.json")]:
        os.symlink(path, bad / os.path.basename(path))
    victim = list_shards(shards, "train")[1]
    os.remove(bad / os.path.basename(victim))
    (bad / os.path.basename(victim)).write_bytes(open(victim, "rb").read()[:-100])  # truncated
    proc = run_cli("--data-dir", bad, "--out-dir", tmp_path / "o2", *TINY, "--max-steps", "1")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o2").exists()


def test_user_mistakes_are_one_line(shards, tmp_path, capsys):
    """Each mistake: `error: ...` in one line, exit code 2, through run_cli as the script's __main__ calls it (in
    this process: a subprocess a case cost seconds of torch import; test_corrupt_shard_is_a_clear_error runs one)."""
    for flags, message in ((["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
                           (["--lr", "0"], "--lr: must be > 0"),
                           (["--total-batch-size", "100"], "not a multiple of --block-size"),
                           (["--total-batch-size", "96"], "does not split into micro-batches"),
                           (["--n-embd", "31"], "n_embd (31) must be divisible by n_head (2)"),
                           (["--n-embd", "1000000", "--n-head", "1"], "GiB of weights"),
                           (["--dtype", "float16"], "float16"),
                           (["--nonsense"], "unrecognized arguments: --nonsense"),
                           (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'")):
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(train_gpt2.main, ["--data-dir", shards, "--out-dir", str(tmp_path / "o"), *TINY,
                                          "--max-steps", "1", *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (flags, err)
        assert message in err, (flags, err)
    with pytest.raises(UserError, match="no train shards"):
        train(str(tmp_path), tmp_path / "o", "--max-steps", "1")
    assert not (tmp_path / "o").exists()


def test_sigterm_saves_a_checkpoint_and_exits_0(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data-dir", shards, "--out-dir",
                             str(out), *TINY, "--max-steps", "100000", "--eval-interval", "0", "--ckpt-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV1)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "log.jsonl").exists():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert 1 <= ckpt["step"] < 100000 and max(losses(out)) == ckpt["step"]


KILL_DURING_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import torch, train_gpt2
real_save, calls = torch.save, []
def save_then_die(obj, path, *a, **k):
    calls.append(path)
    if len(calls) == 1:
        return real_save(obj, path, *a, **k)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
train_gpt2.main({argv!r})
"""


def test_killed_during_checkpoint_keeps_the_previous_one(shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-dir", shards, "--out-dir", str(out), *TINY, "--max-steps", "10", "--ckpt-interval", "2",
            "--eval-interval", "0"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=ROOT, argv=argv)], timeout=120,
                          capture_output=True, env=ENV1)
    assert proc.returncode == -9
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2  # the whole first checkpoint, not the half second
    assert len([n for n in os.listdir(out) if n.endswith(".tmp")]) == 1  # the killed write's temp file...
    train_gpt2.main(argv[:4] + ["--init-from", "resume"])
    assert load_checkpoint(out / "ckpt.pt")["step"] == 10
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # ...is removed by the next run


# ---------------------------------------------------------------------------------------------- the step

class MaskedRows:
    """A data source for Trainer: deterministic rows whose targets are masked (-1) in a different number of
    places each, as instruction data is."""

    def __init__(self, rows, seq_len, rank=0, world_size=1, vocab=200):
        self.rows, self.seq_len, self.rank, self.world_size, self.vocab = rows, seq_len, rank, world_size, vocab
        self.steps_per_epoch, self.signature = 1000, {"rows": rows}

    def row(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        x, y = torch.randint(0, self.vocab, (2, self.seq_len), generator=g)
        y[: (i * 7) % self.seq_len] = -1  # a prompt-like masked prefix of varying length
        return x, y

    def batch(self, step):
        rows = [self.row(step * self.rows + k) for k in range(self.rank, self.rows, self.world_size)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def make_args(tmp_path, **flags):
    args = pretrain_parser().parse_args(["--out-dir", str(tmp_path), "--device", "cpu", "--no-compile",
                                         "--warmup-steps", "0", "--max-steps", "10", "--prefetch", "2"])
    vars(args).update({"min_lr": args.lr, **flags})
    return args


def test_loss_is_the_mean_over_all_counted_tokens_of_the_step(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=200, block_size=16))
    reference = GPT(tiny_config(vocab_size=200, block_size=16))
    reference.load_state_dict(model.state_dict())
    data = MaskedRows(6, 16)
    trainer = Trainer(model, make_args(tmp_path, batch_size=2), data)  # 3 micro-batches, different counts
    x, y = data.batch(0)
    loss = trainer.forward_backward(x, y)
    _, ref_loss = reference(x, y)  # the mean over every counted token of the step
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_log_record_has_throughput_and_mfu(tmp_path):
    trainer = Trainer(GPT(tiny_config(vocab_size=200, block_size=16)), make_args(tmp_path, batch_size=2),
                      MaskedRows(4, 16))
    trainer.t_start, trainer.peak_flops = time.time(), 1e12  # as on a GPU of 1 TFLOP/s
    loss, norm, tokens = trainer.train_step()
    rec = trainer.train_record(loss, norm, 1, tokens, 0.5)
    assert tokens == 4 * 16 and rec["tokens_per_sec"] == 128
    assert rec["mfu"] == pytest.approx(128 * trainer.raw_model.flops_per_token(16) / 1e12)
    assert rec["lr"] == trainer.args.lr and rec["epoch"] == 0.001


def test_cuda_oom_halves_the_micro_batch(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=200, block_size=16))
    same = GPT(tiny_config(vocab_size=200, block_size=16))
    same.load_state_dict(model.state_dict())
    real_forward = GPT.forward

    def small_batches_only(self, idx, *a, **k):
        if idx.size(0) > 2 and self is model:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, idx, *a, **k)

    monkeypatch.setattr(GPT, "forward", small_batches_only)
    big = Trainer(model, make_args(tmp_path / "big", batch_size=8), MaskedRows(8, 16))
    small = Trainer(same, make_args(tmp_path / "small", batch_size=2), MaskedRows(8, 16))
    os.makedirs(tmp_path / "big")
    big.t_start = time.time()
    for _ in range(3):
        assert big.train_step()[0].item() == pytest.approx(small.train_step()[0].item(), abs=1e-5)
    assert big.micro == 2
    events = [json.loads(line) for line in open(tmp_path / "big" / "log.jsonl")]
    assert [e["micro_batch"] for e in events if e.get("event") == "oom"] == [4, 2]
    for p, q in zip(model.parameters(), same.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    with pytest.raises(UserError, match="CUDA out of memory at micro batch 1 x 16 tokens: lower --batch-size or "
                                        "--block-size"):
        Trainer(GPT(tiny_config(vocab_size=200, block_size=16)), make_args(tmp_path, batch_size=1),
                MaskedRows(8, 16)).train_step()


# ---------------------------------------------------------------------------------------------- data order

def test_token_windows_order_ranks_and_prefetch(tmp_path):
    sizes = [50, 7, 64]  # shards of odd sizes: windows must cross their boundaries
    paths = [write_shard(tmp_path / f"s_train_{i + 1:06d}.bin", np.arange(sum(sizes[:i]), sum(sizes[:i + 1])))
             for i in range(3)]
    T = 8
    one = TokenWindows(paths, T, 3, seed=5)
    assert one.n_windows == (121 - 1) // T == 15 and one.steps_per_epoch == 5
    seen = []
    for step in range(10):  # 30 windows: two full epochs
        x, y = one.batch(step)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # contiguous stream, shifted by one
        seen += (x[:, 0] // T).tolist()
    assert sorted(seen[:15]) == sorted(seen[15:]) == list(range(15))  # every window once per epoch
    assert seen[:15] != seen[15:]  # a new order each epoch
    assert torch.equal(TokenWindows(paths, T, 3, seed=5).batch(7)[0], one.batch(7)[0])  # a function of the step

    # two ranks: the union of their rows of a step is the single process's step
    single = TokenWindows(paths, T, 4, seed=5)
    ranks = [TokenWindows(paths, T, 4, rank=r, world_size=2, seed=5) for r in range(2)]
    for step in range(4):
        got = torch.cat([ranks[0].batch(step)[0], ranks[1].batch(step)[0]])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, single.batch(step)[0].tolist()))

    # the prefetch thread hands out exactly the rows of each step
    trainer = Trainer(GPT(tiny_config(block_size=8)), make_args(tmp_path, batch_size=2, prefetch=3), single)
    for step in range(6):
        assert torch.equal(trainer.fetch(step)[0], single.batch(step)[0])
    trainer.pool.shutdown()


def test_val_windows_same_for_any_world_size(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(200))
    paths = [str(tmp_path / "v_val_000000.bin")]
    single = val_windows(paths, 8, 4, max_windows=10)
    split = [b for r in range(3) for b in val_windows(paths, 8, 4, max_windows=10, rank=r, world_size=3)]
    rows = lambda batches: sorted(tuple(x.tolist()) for xb, yb in batches for x, y in zip(xb, yb) if (y != -1).all())
    assert rows(single) == rows(split) and len(rows(single)) == 10
    assert all(x.shape == (4, 8) for x, _ in split)  # one shape: padded rows have targets -1


def test_resume_refuses_changed_data(shards, tmp_path):
    train(shards, tmp_path, "--max-steps", "2", "--eval-interval", "0")
    with pytest.raises(UserError, match="data changed since the checkpoint"):
        train(shards, tmp_path, "--max-steps", "4", "--init-from", "resume", "--block-size", "16")


def test_lr_schedule_and_peak_flops():
    a = argparse.Namespace(max_steps=100, warmup_steps=10, lr=2.0, min_lr=0.2)
    assert lr_factor(a, 0) == pytest.approx(0.1)
    assert lr_factor(a, 9) == pytest.approx(1.0)
    assert lr_factor(a, 55) == pytest.approx(0.55)
    assert lr_factor(a, 100) == pytest.approx(0.1)
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops_for_name("Some Future GPU") is None
