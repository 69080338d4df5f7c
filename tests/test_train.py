"""train_gpt2.py on CPU with a tiny model: learning, exact resume, signals, crash safety, data order."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, tiny_config, require

import train_gpt2
from checkpoint import load_checkpoint
from common import UserError
from fineweb import list_shards, write_shard, write_token_shards
from model import GPT
from train_gpt2 import (Prefetcher, TokenWindows, Trainer, TrainConfig, ValWindows, lr_at, peak_flops_for_name)

CORPUS = os.path.join(SHARED_DATA, "corpus", "standard-ebooks.jsonl.xz")
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses: tiny models gain nothing from threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (two threads stall each other on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corpus_documents(n_chars):
    """The start of the real corpus (public-domain books), cut into ~2k-character documents."""
    import json as _json
    import lzma

    require(os.path.isfile(CORPUS), "shared corpus not present")
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        text = _json.loads(f.readline())["text"][:n_chars]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real tokens: a 6k-token val shard and 3 train shards of 6k tokens."""
    out = tmp_path_factory.mktemp("shards")
    write_token_shards(corpus_documents(100_000), str(out), prefix="books", shard_size=6000, max_tokens=24000,
                       workers=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def periodic_shards(tmp_path_factory):
    """A random 97-token sequence over 128 ids, repeated: learnable from context, cheap with --vocab-size 128."""
    out = tmp_path_factory.mktemp("periodic")
    period = np.random.default_rng(0).integers(0, 128, 97)
    stream = np.tile(period, 40)
    write_shard(out / "p_val_000000.bin", stream[:1000])
    write_shard(out / "p_train_000001.bin", stream[1000:2500])
    write_shard(out / "p_train_000002.bin", stream[2500:])
    return str(out)


TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
        "--total-batch-size", "128", "--device", "cpu", "--no-compile", "--log-interval", "1", "--eval-steps", "2",
        "--sample-tokens", "0", "--no-plot", "--warmup-steps", "2", "--seed", "7"]


def train(data_dir, out_dir, *extra):
    return train_gpt2.main(["--data-dir", data_dir, "--out-dir", str(out_dir), *TINY, *extra])


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
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"} <= set(log[-1])
    assert "mfu" not in log[-1]  # CPU: no peak FLOPs, no MFU
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 40 and ckpt["metrics"]["val_loss"] == metrics["val_loss"]
    assert ckpt["train_state"]["data"]["epoch"] >= 1  # 40 steps x 4 windows > 89 windows: several epochs
    assert all(not k.startswith(("_orig_mod", "module")) for k in ckpt["model"])
    assert os.path.isfile(os.path.join(tmp_path, "loss.png"))


def test_resume_continues_exactly(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--max-steps", "12", "--eval-interval", "6", "--ckpt-interval", "5", "--lr", "3e-3",
              "--dropout", "0.1", "--hellaswag", os.path.join(SHARED_DATA, "hellaswag_val.jsonl.xz"),
              "--hellaswag-limit", "4", "--sample-tokens", "6"]
    train(shards, straight, *common)
    first = train(shards, split, *common, "--stop-at-step", "6")
    assert first["stopped"] and load_checkpoint(split / "ckpt.pt")["step"] == 6
    train(shards, split, *common, "--init-from", "resume")
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    val_a = {r["step"]: r["val_loss"] for r in read_log(straight) if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in read_log(split) if "val_loss" in r}
    assert val_a == pytest.approx(val_b, abs=1e-6) and sorted(val_a) == [6, 12]
    wa, wb = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert wa["step"] == wb["step"] == 12
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    assert wa["train_state"]["data"] == wb["train_state"]["data"]
    samples = [json.loads(line) for line in open(straight / "samples.jsonl")]
    assert [s["step"] for s in samples] == [6, 6, 12, 12] and all(s["text"] for s in samples)
    assert samples == [json.loads(line) for line in open(split / "samples.jsonl")]
    assert all("hellaswag_acc" in r for r in read_log(straight) if "val_loss" in r)


def test_resume_without_checkpoint_is_clear(shards, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(shards, tmp_path, "--max-steps", "2", "--init-from", "resume")


def test_corrupt_shard_is_a_clear_error(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in list_shards(shards, "val") + list_shards(shards, "train"):
        os.symlink(path, bad / os.path.basename(path))
    victim = list_shards(shards, "train")[1]
    os.remove(bad / os.path.basename(victim))
    (bad / os.path.basename(victim)).write_bytes(open(victim, "rb").read()[:-100])  # truncated
    with pytest.raises(UserError, match="truncated or corrupt"):
        train(str(bad), tmp_path / "out", "--max-steps", "1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data-dir", str(bad),
                           "--out-dir", str(tmp_path / "o2"), *TINY, "--max-steps", "1"],
                          capture_output=True, text=True, timeout=120, env=ENV1)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: token shard")
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- signals, crashes

def test_sigterm_saves_a_checkpoint_and_exits_0(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data-dir", shards, "--out-dir", str(out),
           *TINY, "--max-steps", "100000", "--eval-interval", "0", "--ckpt-interval", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV1)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "log.jsonl").exists():
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert 1 <= ckpt["step"] < 100000
    assert max(losses(out)) == ckpt["step"]


KILL_DURING_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import torch, checkpoint, train_gpt2
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
    assert [n for n in os.listdir(out) if n.endswith(".pt")] == ["ckpt.pt"]


# ---------------------------------------------------------------------------------------------- loss normalisation, OOM

class MaskedBatches:
    """Deterministic batches whose targets are masked (-1) in a different number of places each time."""

    def __init__(self, batch_size, seq_len, rank=0, world_size=1, vocab=200):
        self.batch_size, self.seq_len, self.rank, self.world_size, self.vocab = batch_size, seq_len, rank, world_size, vocab
        self.position = 0

    def example(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        y = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        y[: (i * 7) % self.seq_len] = -1  # prompt-like masked prefix of varying length
        return x, y

    def next_batch(self):
        first = self.position + self.rank * self.batch_size
        rows = [self.example(first + k) for k in range(self.batch_size)]
        self.position += self.world_size * self.batch_size
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def set_batch_size(self, b):
        self.batch_size = b

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, s):
        self.position = s["position"]


def sgd_trainer(model, batch_size, total_examples, seq_len=16, **kw):
    kw.setdefault("out_dir", "unused")
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len,
                      total_batch_size=total_examples * seq_len, max_steps=10, warmup_steps=0, lr=1.0, min_lr=1.0,
                      grad_clip=0.0, device="cpu", prefetch=2, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return Trainer(model, cfg, MaskedBatches(batch_size, seq_len), optimizer=opt)


def test_masked_loss_is_the_mean_over_all_counted_tokens():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=200, block_size=16))
    reference = GPT(tiny_config(vocab_size=200, block_size=16))
    reference.load_state_dict(model.state_dict())
    trainer = sgd_trainer(model, batch_size=2, total_examples=6)  # 3 micro-batches, different counts
    assert trainer.grad_accum == 3
    loss, _ = trainer.train_step()
    data = MaskedBatches(6, 16)
    x, y = data.next_batch()
    _, ref_loss = reference(x, y)  # mean over every counted token of the step
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        before = q.detach() if q.grad is None else q.detach() - q.grad  # SGD lr 1: p_new = p - grad
        assert torch.allclose(p.detach(), before, atol=1e-6), name


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
    big = sgd_trainer(model, batch_size=8, total_examples=8, out_dir=str(tmp_path))
    small = sgd_trainer(same, batch_size=2, total_examples=8, out_dir=str(tmp_path / "small"))
    for _ in range(3):
        a, _ = big.train_step()
        b, _ = small.train_step()
        assert a.item() == pytest.approx(b.item(), abs=1e-5)  # same tokens per step
    assert big.micro_batch == 2 and big.grad_accum == 4
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["micro_batch"] for e in events if e.get("event") == "oom"] == [4, 2]
    for p, q in zip(model.parameters(), same.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


# ---------------------------------------------------------------------------------------------- data order

def test_token_windows_order_ranks_and_state(tmp_path):
    for i, n in enumerate([50, 7, 64]):  # shards of odd sizes: windows must cross their boundaries
        write_shard(tmp_path / f"s_train_{i + 1:06d}.bin", np.arange(sum([50, 7, 64][:i]), sum([50, 7, 64][:i + 1])))
    paths = list_shards(tmp_path, "train")
    T, B = 8, 3
    one = TokenWindows(paths, T, B, seed=5)
    assert one.n_windows == (121 - 1) // T == 15
    seen = []
    for _ in range(10):  # 30 windows: two full epochs
        x, y = one.next_batch()
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # contiguous stream, shifted by one
        seen += (x[:, 0] // T).tolist()
    assert sorted(seen[:15]) == sorted(seen[15:]) == list(range(15))  # every window once per epoch
    assert seen[:15] != seen[15:]  # a new order each epoch
    assert one.state_dict()["epoch"] == 2 and one.state_dict()["position"] == 0

    # two ranks with batch B each: the union of their batches is the single process's pair of batches
    single = TokenWindows(paths, T, B, seed=5)
    ranks = [TokenWindows(paths, T, B, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(4):
        expected = torch.cat([single.next_batch()[0], single.next_batch()[0]])
        got = torch.cat([ranks[0].next_batch()[0], ranks[1].next_batch()[0]])
        assert torch.equal(expected, got)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()

    # prefetching never changes the order, and its state is that of the last batch handed out
    plain, fetched = TokenWindows(paths, T, B, seed=5), Prefetcher(TokenWindows(paths, T, B, seed=5), depth=3)
    for _ in range(4):
        assert torch.equal(plain.next_batch()[0], fetched.next_batch()[0])
    state = fetched.state_dict()
    assert state == plain.state_dict()
    resumed = TokenWindows(paths, T, B, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], fetched.next_batch()[0])
    fetched.close()
    with pytest.raises(UserError, match="data changed"):
        TokenWindows(paths[:2], T, B).load_state_dict(state)


def test_val_windows_same_for_any_world_size(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(200))
    paths = [str(tmp_path / "v_val_000000.bin")]
    single = list(ValWindows(paths, 8, 4, max_windows=10).batches())
    split = [b for r in range(3) for b in ValWindows(paths, 8, 4, max_windows=10, rank=r, world_size=3).batches()]
    rows = lambda batches: sorted(tuple(x.tolist()) for xb, yb in batches for x, y in zip(xb, yb) if (y != -1).all())
    assert rows(single) == rows(split) and len(rows(single)) == 10
    assert all(x.shape == (4, 8) for x, _ in split)  # fixed shapes: padded rows have targets -1


def test_lr_schedule_and_peak_flops():
    assert lr_at(0, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops_for_name("Some Future GPU") is None


def test_bad_flags_are_user_errors(shards, tmp_path):
    with pytest.raises(UserError, match="not a multiple"):
        train(shards, tmp_path, "--max-steps", "1", "--total-batch-size", "100")
    with pytest.raises(UserError, match="float16"):
        train(shards, tmp_path, "--max-steps", "1", "--dtype", "float16")
    with pytest.raises(UserError, match="no train shards"):
        train(str(tmp_path), tmp_path / "o", "--max-steps", "1")


def test_compiled_training_evaluates_and_samples(shards, tmp_path):
    """--compile: the step and val loss run compiled; HellaSwag and KV-cache sampling run on raw_model.

    aot_eager keeps the test quick on CPU; it goes through dynamo and AOTAutograd like inductor does.
    """
    flags = ["--max-steps", "4", "--eval-interval", "2", "--ckpt-interval", "0", "--sample-tokens", "4",
             "--hellaswag", os.path.join(SHARED_DATA, "hellaswag_val.jsonl.xz"), "--hellaswag-limit", "4"]
    train(shards, tmp_path / "eager", *flags)
    metrics = train(shards, tmp_path / "compiled", *flags, "--compile", "--compile-backend", "aot_eager")
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "val_loss", "hellaswag_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert metrics["val_loss"] == pytest.approx(compiled[-1]["val_loss"])
    samples = [json.loads(line) for line in open(tmp_path / "compiled" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    ckpt = load_checkpoint(tmp_path / "compiled" / "ckpt.pt")
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_init_from_checkpoint_and_hf_folder(shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    metrics = train(shards, tmp_path / "ft", "--init-from", str(tmp_path / "hf"), "--max-steps", "2",
                    "--eval-interval", "2")
    again = train(shards, tmp_path / "ft2", "--init-from", str(tmp_path / "ft" / "ckpt.pt"), "--max-steps", "1",
                  "--eval-interval", "1", "--lr", "1e-12", "--min-lr", "1e-12")
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-3)  # weights carried over, step reset
    assert load_checkpoint(tmp_path / "ft2" / "ckpt.pt")["step"] == 1
    with pytest.raises(UserError, match="model not found"):
        train(shards, tmp_path / "x", "--init-from", str(tmp_path / "missing.pt"), "--max-steps", "1")


def test_chunked_loss_trains_like_the_plain_loss(shards, tmp_path):
    """--loss-chunk (model.LinearCrossEntropy, no whole logits) gives the plain path's losses and val loss."""
    flags = ["--max-steps", "3", "--eval-interval", "3", "--ckpt-interval", "0"]
    train(shards, tmp_path / "plain", *flags)
    train(shards, tmp_path / "chunked", *flags, "--loss-chunk", "24")  # 64 tokens per micro-batch: ragged chunks
    for a, b in zip(read_log(tmp_path / "plain"), read_log(tmp_path / "chunked")):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
