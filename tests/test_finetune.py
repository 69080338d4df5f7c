"""finetune_dolly.py on CPU with a tiny model and real instruction rows (demo_data/instructions.jsonl.xz).

Masking, the prompt template, learning, exact resume (full and LoRA), the checkpoint layout,
batching under DDP, and clear errors for bad input.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import finetune_dolly
import train_flags
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from common import UserError
from finetune_dolly import InstructionBatches, example_rows, held_out_prompts, prompt_length, val_batches
from model import GPT, GPTConfig
from prepare_dolly import normalize_text, prepare, read_file_rows
from prompt import format_prompt
from tokenizer import EOT_ID, decode, encode

INSTRUCTIONS = os.path.join(ROOT, "demo_data", "instructions.jsonl.xz")
TINY_CONFIG = dict(block_size=256, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)


def wiki_rows(n):
    return read_file_rows(INSTRUCTIONS, limit=n)


def prepare_rows(rows, out, **kw):
    prepare(rows, str(out), {"type": "test"}, progress=False, **kw)
    return str(out)


@pytest.fixture(scope="module")
def data300(tmp_path_factory):
    """300 real rows prepared by prepare_dolly (5% val, stratified)."""
    return prepare_rows(wiki_rows(300), tmp_path_factory.mktemp("d300"))


@pytest.fixture(scope="module")
def data80(tmp_path_factory):
    """80 real rows: with --block-size 128 about 35 train examples, a few steps an epoch."""
    return prepare_rows(wiki_rows(80), tmp_path_factory.mktemp("d80"), val_fraction=0.1)


@pytest.fixture(scope="module")
def data24(tmp_path_factory):
    """30 real rows: with --block-size 128, 13 train examples (4 steps an epoch of 3) and 3 val."""
    return prepare_rows(wiki_rows(30), tmp_path_factory.mktemp("d24"), val_fraction=0.2)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A freshly initialised tiny GPT saved as a pretraining checkpoint (the --init-from of most tests)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CONFIG))
    path = tmp_path_factory.mktemp("init") / "ckpt.pt"
    save_checkpoint(path, kind="pretrain", model_state=model.state_dict(), config=model.config.to_dict(), step=0)
    return str(path)


FAST = ["--device", "cpu", "--no-compile", "--no-plot", "--log-interval", "1", "--seed", "5", "--prefetch", "2"]


def finetune(data_dir, out_dir, init_from, *extra):
    return finetune_dolly.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--init-from", str(init_from),
                                *FAST, *extra])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- masking

def test_targets_are_the_next_token_where_the_mask_is_on():
    tokens = np.array([11, 12, 13, 21, 22, EOT_ID])  # prompt 11 12 13, response 21 22, EOT
    mask = np.array([0, 0, 0, 1, 1, 1], dtype=np.uint8)
    x, y = example_rows(tokens, mask)
    assert x.tolist() == [11, 12, 13, 21, 22]
    assert y.tolist() == [-1, -1, 21, 22, EOT_ID]  # the last prompt position predicts the first response token
    assert prompt_length(mask) == 3


def _batch_loss(model, x, y):
    with torch.no_grad():
        return model(x, y)[1].item()


def test_prompt_targets_do_not_change_the_loss_response_targets_do(data300):
    split = finetune_dolly.load_instruction_data(data300)["train"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CONFIG)).eval()
    batches = InstructionBatches(split, 256, 4, seed=1)
    x, y = batches.batch(0)  # (4, T)
    rows = batches.order(0)[0]
    base = _batch_loss(model, x, y)

    # reference: per-token cross-entropy of the logits, averaged over response positions only
    with torch.no_grad():
        logits = model(x)[0].float()  # (4, T, V)
    logp = torch.log_softmax(logits, -1)
    total, count = 0.0, 0
    for k, i in enumerate(rows):
        s, L = int(batches.examples.starts[i]), int(batches.examples.lengths[i])
        toks, mask = split["tokens"][s:s + L].astype(np.int64), split["loss_mask"][s:s + L]
        for t in range(L - 1):
            if mask[t + 1]:
                total -= logp[k, t, toks[t + 1]].item()
                count += 1
    assert base == pytest.approx(total / count, rel=1e-5)
    assert count == int((y != -1).sum())

    def targets_with(change):
        """y rebuilt from tokens where `change` (positions where mask == 0 or == 1) hold other ids."""
        y2 = torch.full_like(y, -1)
        for k, i in enumerate(rows):
            s, L = int(batches.examples.starts[i]), int(batches.examples.lengths[i])
            toks, mask = split["tokens"][s:s + L].astype(np.int64).copy(), split["loss_mask"][s:s + L]
            toks[change(mask)] = (toks[change(mask)] + 1000) % 50000
            y2[k, :L - 1] = torch.from_numpy(example_rows(toks, mask)[1])
        return y2

    y_prompt = targets_with(lambda m: m == 0)
    assert torch.equal(y_prompt, y)
    assert _batch_loss(model, x, y_prompt) == base
    y_resp = targets_with(lambda m: m == 1)
    assert not torch.equal(y_resp, y)
    assert abs(_batch_loss(model, x, y_resp) - base) > 1e-3


# ---------------------------------------------------------------------------------------------- template

def test_training_prompt_is_the_inference_prompt(tmp_path):
    rows = wiki_rows(200)
    with_ctx = [r for r in rows if r["context"].strip()][:4]
    without = [r for r in rows if not r["context"].strip()][:4]
    assert with_ctx and without
    chosen = with_ctx + without
    data = finetune_dolly.load_instruction_data(prepare_rows(chosen, tmp_path, val_fraction=0.0))
    split = data["train"]
    offsets = split["offsets"]
    assert len(offsets) - 1 == len(chosen)  # val_fraction 0: every row, in input order
    for i, row in enumerate(chosen):
        s, e = int(offsets[i]), int(offsets[i + 1])
        n = prompt_length(split["loss_mask"][s:e])
        expected = format_prompt(normalize_text(row["instruction"]), normalize_text(row["context"]))
        assert decode(split["tokens"][s:s + n].tolist()) == expected
        assert split["tokens"][s:s + n].tolist() == encode(expected)  # the very ids inference feeds
        assert ("### Input:" in expected) == bool(row["context"].strip())
        assert decode(split["tokens"][s + n:e - 1].tolist()) == normalize_text(row["response"])
        assert split["tokens"][e - 1] == EOT_ID
    # the answers logged during training are generated from these same prompt strings
    prompts = held_out_prompts(split, 3, 1024)
    assert prompts and all(p in [format_prompt(normalize_text(r["instruction"]), normalize_text(r["context"]))
                                 for r in chosen] for p in prompts)


# ---------------------------------------------------------------------------------------------- batching

def test_batches_are_whole_padded_examples_shuffled_per_epoch(data80):
    split = finetune_dolly.load_instruction_data(data80)["train"]
    src = InstructionBatches(split, 128, 4, seed=3, pad_multiple=16)
    n, spe = src.examples.n, src.steps_per_epoch
    assert spe == n // 4 and src.examples.n_too_long > 0  # longer examples are left out, not cut
    for step in range(spe):
        x, y = src.batch(step)
        assert x.shape == y.shape and x.shape[0] == 4 and x.shape[1] % 16 == 0 and x.shape[1] <= 128
        last = (y != -1).nonzero()[:, 1].max()  # the longest row ends within the last 16 columns
        assert x.shape[1] - 16 <= last < x.shape[1]
    first, second = src.order(0), src.order(1)
    assert first.shape == (spe, 4) and len(set(first.ravel().tolist())) == spe * 4  # no example twice an epoch
    assert first.tolist() != second.tolist()  # reshuffled
    assert (np.diff(src.examples.lengths[first], axis=1) <= 0).all()  # sorted within each step (longest first)
    again = InstructionBatches(split, 128, 4, seed=3, pad_multiple=16)
    assert torch.equal(again.batch(spe + 1)[0], src.batch(spe + 1)[0])  # seeded: a function of the step


def test_ranks_take_disjoint_parts_of_the_same_step(data80):
    split = finetune_dolly.load_instruction_data(data80)["train"]
    one = InstructionBatches(split, 128, 8, seed=2)
    ranks = [InstructionBatches(split, 128, 8, rank=r, world_size=2, seed=2) for r in range(2)]

    def examples(batch):  # each row's unpadded input tokens (it ends with the last counted target)
        x, y = batch
        return [tuple(x[k, :int(torch.nonzero(y[k] != -1).max()) + 1].tolist()) for k in range(len(x))]

    for step in range(3):
        rows_one = examples(one.batch(step))
        rows_ddp = [r for src in ranks for r in examples(src.batch(step))]
        assert sorted(rows_one) == sorted(rows_ddp) and len(set(rows_ddp)) == len(rows_ddp) == 8
    val = [val_batches(split, 128, 3, rank=r, world_size=2) for r in range(2)]
    counted = sum(int((y != -1).sum()) for v in val for _, y in v)
    assert counted == sum(int((y != -1).sum()) for _, y in val_batches(split, 128, 5))


# ---------------------------------------------------------------------------------------------- learning

def test_finetune_lowers_val_loss_and_keeps_the_best(data300, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    metrics = finetune(data300, out, tiny_ckpt, "--block-size", "128", "--batch-size", "4", "--examples-per-step",
                       "4", "--max-steps", "6", "--lr", "3e-2", "--eval-interval", "3", "--sample-count", "2",
                       "--sample-tokens", "6", "--sample-prompt", "Name a colour.", "--plot")
    log = read_log(out)
    vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert sorted(vals) == [0, 3, 6]
    assert vals[3] < vals[0] - 0.5 and vals[6] < vals[3]  # a random-init model learns the responses' tokens
    assert metrics["best_val_loss"] == min(vals[3], vals[6])
    assert all(r["tokens_per_sec"] > 0 and "epoch" in r for r in log if "train_loss" in r)

    best = load_checkpoint(out / "ckpt.pt")
    assert best["kind"] == "sft" and best["step"] == metrics["best_step"] and best["optimizer"] is None
    assert best["metrics"]["best_val_loss"] == metrics["best_val_loss"]
    model_from_checkpoint(best)  # what inference.py does with --ckpt OUT_DIR
    last = load_checkpoint(out / "last.pt")
    assert last["kind"] == "sft" and last["step"] == 6 and last["optimizer"]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0] * 3 + [3] * 3 + [6] * 3
    assert all(s["prompt"].endswith("### Response:\n") and s["text"] for s in samples)
    assert samples[2]["prompt"] == format_prompt("Name a colour.")
    assert os.path.isfile(out / "loss.png") and not os.path.exists(out / "adapter.pt")


RESUME = ["--block-size", "128", "--batch-size", "1", "--examples-per-step", "3", "--max-steps", "6",
          "--eval-interval", "3", "--ckpt-interval", "4", "--lr", "2e-3", "--sample-tokens", "2", "--sample-count", "1",
          "--eval-examples", "2"]


@pytest.mark.parametrize("mode", ["full", "lora", "lora_muon"])
def test_resume_equals_uninterrupted(data24, tiny_ckpt, tmp_path, mode):
    extra = ["--dropout", "0.1"] if mode == "full" else ["--lora-rank", "4", "--lora-dropout", "0.1",
                                                         "--lora-targets", "c_attn,mlp.c_proj", "--lr", "1e-2"]
    if mode == "lora_muon":  # Muon takes every adapter matrix; the resume below names no optimizer
        extra += ["--optimizer", "muon", "--muon-lr", "0.05"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    finetune(data24, straight, tiny_ckpt, *RESUME, *extra)
    first = finetune(data24, split, tiny_ckpt, *RESUME, *extra, "--stop-at-step", "5")
    assert first["stopped"] and load_checkpoint(split / "last.pt")["step"] == 5
    for name, line in (("log.jsonl", {"step": 6, "train_loss": 1.0}), ("samples.jsonl", {"step": 6, "text": "x"})):
        with open(split / name, "a") as f:  # as if the run had gone on past its checkpoint, then crashed
            f.write(json.dumps(line) + "\n")
    finetune(data24, split, "resume", "--device", "cpu", "--no-compile")  # every other flag from last.pt

    la, lb = read_log(straight), read_log(split)
    a = {r["step"]: r["train_loss"] for r in la if "train_loss" in r}
    b = {r["step"]: r["train_loss"] for r in lb if "train_loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    va = {r["step"]: r["val_loss"] for r in la if "val_loss" in r}
    vb = {r["step"]: r["val_loss"] for r in lb if "val_loss" in r}
    assert sorted(va) == [0, 3, 6] and va == pytest.approx(vb, abs=1e-6)
    for name in ("last.pt", "ckpt.pt"):
        wa, wb = load_checkpoint(straight / name), load_checkpoint(split / name)
        assert wa["step"] == wb["step"] and wa["model"].keys() == wb["model"].keys()
        for key in wa["model"]:
            assert torch.equal(wa["model"][key], wb["model"][key]), (name, key)
    sa, sb = ([json.loads(line) for line in open(d / "samples.jsonl")] for d in (straight, split))
    assert sa == sb and [s["step"] for s in sa] == [0, 3, 6]
    assert [r["epoch"] for r in la if r["step"] == 6] == [1.5]  # 4 steps an epoch: the run crossed into the second

    best = load_checkpoint(straight / "ckpt.pt")
    plain = model_from_checkpoint(best)  # canonical names: inference needs nothing special
    assert not os.path.exists(straight / "adapter.pt")  # ckpt.pt holds the merged weights: what everything loads
    if mode == "lora_muon":
        last = load_checkpoint(split / "last.pt")
        assert last["args"]["optimizer"] == "muon" and list(last["optimizer"]) == ["muon"]
        assert len(last["optimizer"]["muon"]["param_groups"][0]["params"]) == 2 * 2 * 2  # A, B of 2 layers x 2 blocks
        assert va[6] < va[0]
    if mode != "full":  # the base stayed frozen; last.pt (base + adapters) at the best step = ckpt.pt, merged
        base = model_from_checkpoint(load_checkpoint(tiny_ckpt))
        last = load_checkpoint(straight / "last.pt")
        for key, value in base.state_dict().items():
            assert torch.equal(last["model"][key], value), key
        assert last["lora"]["rank"] == 4 and last["lora"]["targets"] == ["c_attn", "mlp.c_proj"]


def test_ddp_two_ranks_equal_one_process(data24, tiny_ckpt, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with LoRA (frozen base under DDP) equals one process."""
    flags = ["--data-dir", data24, "--init-from", tiny_ckpt, *FAST, "--block-size", "128", "--batch-size", "1",
             "--examples-per-step", "4", "--max-steps", "3", "--eval-interval", "3", "--lr", "1e-2",
             "--sample-tokens", "2", "--sample-count", "1", "--lora-rank", "2", "--lora-dropout", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "finetune_dolly.py"), *flags, "--out-dir", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finetune_dolly.main([*flags, "--out-dir", str(tmp_path / "one")])
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= 1e-5, (a, b)
    assert one[-1]["tokens_per_sec"] > 0 and two[-1]["tokens_per_sec"] > 0
    wa, wb = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("one", "ddp"))
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["lora"]["rank"] == 2
    samples = [json.loads(line) for line in open(tmp_path / "ddp" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0, 3]  # rank 0 only


def test_init_from_hf_folder_and_from_an_sft_checkpoint(data80, tiny_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    short = ["--block-size", "128", "--batch-size", "4", "--examples-per-step", "4", "--max-steps", "1",
             "--eval-interval", "0"]
    finetune(data80, tmp_path / "a", hf, *short)
    ckpt = load_checkpoint(tmp_path / "a" / "ckpt.pt")  # no evaluation: the final model
    assert ckpt["kind"] == "sft" and ckpt["step"] == 1 and ckpt["config"]["vocab_size"] == 50257
    finetune(data80, tmp_path / "b", tmp_path / "a", *short)  # continue from an sft run's folder
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["args"]["init_from"] == str(tmp_path / "a")


# ---------------------------------------------------------------------------------------------- bad input

def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def _set_template_version(folder):
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    meta["template_version"] = 999
    json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("case, message", [
    ("no_dir", "meta.json: not found"),
    ("no_npz", "val.npz: not found"),
    ("template", "template version 999"),
    ("rank0", "--lora-rank: must be >= 1"),
    ("rank_neg", "--lora-rank: must be >= 1"),
    ("alpha", "--lora-alpha: must be > 0"),
    ("dropout", "--lora-dropout: must be >= 0 and < 1"),
    ("target", "'q_proj' matches no Linear layer"),
    ("lm_head", "tied to the token embedding"),
    ("no_targets", "--lora-targets is empty"),
    ("no_init", "model not found"),
    ("scratch", "starts from a trained model"),
    ("resume", "no checkpoint at"),
    ("group", "does not split into micro-batches"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(data80, tiny_ckpt, tmp_path, case, message):
    data, init, extra = data80, tiny_ckpt, []
    if case == "no_dir":
        data = tmp_path / "nowhere"
    elif case == "no_npz":
        data = _broken_copy(data80, tmp_path / "d", lambda d: os.remove(os.path.join(d, "val.npz")))
    elif case == "template":
        data = _broken_copy(data80, tmp_path / "d", _set_template_version)
    elif case in ("rank0", "rank_neg"):
        extra = ["--lora-rank", "0" if case == "rank0" else "-2"]
    elif case in ("alpha", "dropout"):
        extra = ["--lora-rank", "4", f"--lora-{case}", "0" if case == "alpha" else "1"]
    elif case in ("target", "lm_head", "no_targets"):
        extra = ["--lora-rank", "4", "--lora-targets", {"target": "c_attn,q_proj", "lm_head": "lm_head",
                                                        "no_targets": " , "}[case]]
    elif case == "no_init":
        init = tmp_path / "missing.pt"
    elif case == "scratch":
        init = "scratch"
    elif case == "resume":
        init = "resume"
    elif case == "group":
        extra = ["--batch-size", "3", "--examples-per-step", "8"]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as err:
        finetune(data, out, init, "--block-size", "128", "--max-steps", "2", *extra)
    assert "\n" not in str(err.value)
    assert not out.exists()  # nothing written, not even the folder


def test_existing_run_needs_resume_or_overwrite(data80, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    short = ["--block-size", "128", "--batch-size", "4", "--examples-per-step", "4", "--max-steps", "1",
             "--eval-interval", "0"]
    with pytest.raises(UserError, match="holds a run"):
        finetune(data80, out, tiny_ckpt, *short)
    finetune(data80, out, tiny_ckpt, *short, "--overwrite")
    assert [r["step"] for r in read_log(out)] == [1] and "train_loss" in read_log(out)[0]
    assert read_log(out)[0]["train_loss"] != 9.0


def test_offline_gpt2_is_one_clear_line(data80, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="could not download 'gpt2'.*offline") as err:
        finetune(data80, tmp_path / "out", "gpt2")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_cli_exit_code_2_and_one_line(data80, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "finetune_dolly.py"), "--data-dir", data80,
                           "--out-dir", str(tmp_path / "out"), "--init-from", str(tmp_path / "none.pt"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_every_training_flag_of_pretraining_is_a_fine_tuning_flag():
    """The training flags are defined once (train_flags.add_train_args): fine-tuning has all of them."""
    shared = {a.dest for a in train_flags.add_train_args(argparse.ArgumentParser())._actions}
    assert {"hellaswag", "wandb", "prefetch", "stop_at_step", "optimizer", "muon_lr", "overwrite"} <= shared
    assert shared <= {a.dest for a in train_flags.finetune_parser()._actions}
    assert shared <= {a.dest for a in train_flags.pretrain_parser()._actions}
