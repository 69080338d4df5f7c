"""
Instruction-tune GPT-2 on prepare_dolly.py output (full fine-tuning, or LoRA): one process or DDP.

    python prepare_dolly.py --input ../shared/data/wiki-instructions.jsonl.xz --out-dir data/dolly
    python finetune_dolly.py --data-dir data/dolly --init-from out/pretrain --out-dir out/dolly
    python finetune_dolly.py --data-dir data/dolly --init-from gpt2 --out-dir out/dolly-lora --lora-rank 8
    torchrun --standalone --nproc_per_node=8 finetune_dolly.py --data-dir data/dolly --init-from gpt2 --out-dir out/dolly
    python finetune_dolly.py --out-dir out/dolly --init-from resume      # continue exactly (flags from the run)
    python inference.py --ckpt out/dolly --prompt "Name three primary colours."

The training loop is train_gpt2.Trainer (DDP, bf16 autocast, torch.compile, exact resume, signals,
OOM halving, log.jsonl, loss.png); this file adds the instruction data source, the val batches,
answers to held-out instructions at each evaluation, the best-checkpoint policy and LoRA.

--init-from: our checkpoint (pretrain or sft; a ckpt.pt file or the folder holding it), an OpenAI
GPT-2 name (`gpt2`, ...: the Hugging Face hub, online), a local HF GPT-2 folder, or `resume`:
{out_dir}/last.pt with weights (and adapters), optimizer, step, data position and RNG. On resume
every flag not given again comes from the run's checkpoint, so `--init-from resume --out-dir D`
alone continues it exactly; flags given again override (with a warning where that breaks exactness).

Batches: padded, not packed. Each row of a micro-batch is one whole example (prompt, response,
<|endoftext|>), right-padded to the longest row of that micro-batch rounded up to a multiple of
--pad-multiple (64) and capped at the block size; targets are -1 on the padding and wherever the
next token is a prompt token. Why not packing: several examples in one row would attend to each
other (our SDPA path has no document masking), which makes the loss and the gradients depend on
which neighbours an example happens to get; padding is exact. Padding is cheap here because
examples are short (the shared wiki-instructions set: median 134 tokens, 95% under 240, at most
505) and each micro-batch is padded only to its own longest row: every epoch is a seeded shuffle
(generator (seed, epoch)) cut into steps of --examples-per-step examples, and within each step the
examples are sorted by length, so micro-batches hold similar lengths while the set of examples in a step
stays a uniform random draw (no length bias across steps; sorting across steps would make some
steps all-short). Rounding lengths to a multiple of 64 keeps matmul shapes tensor-core friendly
and bounds torch.compile to a few shapes (dynamo marks the length dynamic after the second one);
--pad-multiple equal to the block size gives one fixed shape.

Steps and DDP: a step takes the next E = --examples-per-step examples of the epoch order; every
micro-step takes the next group of batch_size x world_size of them and rank r takes group[r::W]
(similar lengths on every rank). So the ranks' micro-batches of a step are exactly the examples
one process takes for that step, and the loss, sum(token losses) / (response tokens of the step,
all ranks), is the same. Epochs are whole steps: the last (n mod E) examples of each epoch's
shuffle sit that epoch out (different ones each epoch). The data position (epoch, example) is in
the checkpoint, so resume continues mid-epoch exactly. --epochs N gives N x (n // E) steps, or
--max-steps.

Loss: only where loss_mask is 1 (response tokens and the closing <|endoftext|>); the target at
position t is token t+1, so position t is counted when loss_mask[t+1] is 1: the last prompt
position predicts the first response token, and no position predicts a prompt token. Examples
longer than the block size (+1) are left out (counted and reported), never cut.

Defaults (full fine-tuning): lr 5e-5 (HF's default for fine-tuning GPT-2; 12x below the 6e-4
pretraining peak, so the pretrained features survive ~3 epochs), cosine to 0 after a linear warmup
over 3% of the steps, weight decay 0.01, 3 epochs, 32 examples per step (about 270 steps an epoch
for 8.7k examples), dropout as in the initial model. LoRA: lr 3e-4 (adapters start at zero and are
low-rank, so they need a ~10x larger step than full fine-tuning; LoRA papers use 1e-4..3e-4),
rank 8, alpha 16 (scale 2), dropout 0.05, on every Linear of the blocks (c_attn, c_proj, c_fc),
weight decay 0.01. Evaluation (masked val loss over the whole val split, plus greedy answers to a
few held-out val instructions, written to samples.jsonl and printed) 4 times an epoch and at the
end; a last.pt at every evaluation.

Output in --out-dir:
  ckpt.pt      the model with the best val loss (kind "sft", LoRA merged, no optimizer state): the file
               inference.py / serve.py load (`--ckpt OUT_DIR`). Without val data or evaluations: the final model.
  last.pt      the latest training state, for --init-from resume. Full fine-tuning: an ordinary checkpoint.
               LoRA: base weights + `*.lora_A/B` under canonical names (not for inference; use ckpt.pt).
  adapter.pt   (LoRA) the adapter of the best model alone: rank, alpha, dropout, targets, base, weights;
               torch.load(weights_only=True); lora.load_adapter / lora.apply_adapter.
  log.jsonl    step, train_loss, val_loss (step 0: the initial model), best_val_loss, lr, grad_norm,
               tokens_per_sec (real tokens, not padding), epoch, ...;  samples.jsonl: held-out answers;
  loss.png     curves.
"""

import argparse
import json
import os
import sys
import zlib

import numpy as np
import torch

from checkpoint import load_checkpoint, load_model, model_from_checkpoint
from checkpoint import save_checkpoint as write_checkpoint
from common import UserError, run_cli, setup_distributed, teardown_distributed
from lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, describe_memory, has_lora, merged_state_dict, parse_targets
from model import GPT, PRETRAINED_CONFIGS, GPTConfig
from prepare_dolly import load_split
from prompt import PREAMBLE, TEMPLATE_VERSION, format_prompt
from tokenizer import EOT_ID, N_VOCAB, decode
from train_gpt2 import Trainer, TrainConfig, add_system_args, make_sample_hook, warn_resume_differences

BEST_NAME = "ckpt.pt"  # checkpoint.CKPT_NAME: what inference loads from a folder
LAST_NAME = "last.pt"
RUN_FILES = (BEST_NAME, LAST_NAME, "log.jsonl", "samples.jsonl", "loss.png")
DEFAULT_LR = 5e-5
DEFAULT_LORA_LR = 3e-4
WARMUP_FRACTION = 0.03
EVALS_PER_EPOCH = 4
PAD_ID = EOT_ID  # what padding positions hold in x (never attended to by real tokens: causal)


# ====================================================================== data

def load_instruction_data(data_dir):
    """{train, val} splits (prepare_dolly.load_split) and meta.json of a prepare_dolly.py output folder.

    UserError when the folder, a file or the template version is wrong.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder (write it with prepare_dolly.py --out-dir DIR)")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{meta_path}: not found; --data-dir must be a prepare_dolly.py output folder")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object")
    version = meta.get("template_version")
    if version != TEMPLATE_VERSION:
        raise UserError(f"{data_dir} was prepared with prompt template version {version}, but this code uses "
                        f"version {TEMPLATE_VERSION}: run prepare_dolly.py again")
    if meta.get("eot_id", EOT_ID) != EOT_ID:
        raise UserError(f"{meta_path}: eot_id {meta.get('eot_id')} is not GPT-2's {EOT_ID}")
    train = load_split(os.path.join(data_dir, "train.npz"))
    val = load_split(os.path.join(data_dir, "val.npz"))
    if len(train["offsets"]) < 2:
        raise UserError(f"{data_dir}/train.npz holds no examples")
    return {"train": train, "val": val, "meta": meta}


def example_rows(tokens, loss_mask):
    """One example (L,) -> x (L-1,) inputs and y (L-1,) targets: token t+1 where loss_mask[t+1] is 1, else -1."""
    tokens = np.asarray(tokens, dtype=np.int64)
    x = tokens[:-1]
    y = np.where(np.asarray(loss_mask[1:]) == 1, tokens[1:], -1)
    return x, y


def prompt_length(loss_mask):
    """Tokens before the first trained one (the prompt)."""
    return int(np.argmax(np.asarray(loss_mask) == 1))


class _Examples:
    """The examples of one split that fit the block: ids, starts, lengths (+ a fingerprint of the data)."""

    def __init__(self, split, seq_len):
        self.tokens, self.mask, offsets = split["tokens"], split["loss_mask"], split["offsets"]
        lengths = np.diff(offsets)  # (n_all,)
        self.ids = np.flatnonzero(lengths <= seq_len + 1)  # (n,) x holds L - 1 tokens
        self.n_too_long = int(len(lengths) - len(self.ids))
        self.starts, self.lengths = offsets[:-1][self.ids], lengths[self.ids]  # (n,), (n,)
        self.n = len(self.ids)
        self.seq_len = seq_len
        self.fingerprint = zlib.crc32(self.tokens.tobytes(), zlib.crc32(offsets.tobytes()))

    def collate(self, idx, pad_multiple):
        """Examples idx (positions in this set) -> x, y (len(idx), T) int64 tensors, right-padded.

        T = the longest row rounded up to pad_multiple, at most seq_len; x padding = PAD_ID, y padding = -1.
        """
        longest = int(self.lengths[idx].max()) - 1
        T = min(self.seq_len, -(-longest // pad_multiple) * pad_multiple)
        x = np.full((len(idx), T), PAD_ID, dtype=np.int64)
        y = np.full((len(idx), T), -1, dtype=np.int64)
        for k, i in enumerate(idx):
            s, L = int(self.starts[i]), int(self.lengths[i])
            x[k, :L - 1], y[k, :L - 1] = example_rows(self.tokens[s:s + L], self.mask[s:s + L])
        return torch.from_numpy(x), torch.from_numpy(y)


class InstructionBatches:
    """Training batches of whole, padded examples (see the module docstring), for train_gpt2.Trainer.

    next_batch() -> (x, y) of this rank: (batch_size, T) int64, T <= seq_len varying per batch.
    State: epoch, position (examples of the epoch consumed by all ranks), tokens_seen (real input
    tokens, all ranks), and what the order depends on (checked at resume).
    """

    def __init__(self, split, seq_len, batch_size, examples_per_step, rank=0, world_size=1, seed=0,
                 pad_multiple=64):
        self.examples = _Examples(split, seq_len)
        self.batch_size, self.examples_per_step = batch_size, examples_per_step
        self.rank, self.world_size, self.seed, self.pad_multiple = rank, world_size, seed, pad_multiple
        self._check_sizes(batch_size)
        self.steps_per_epoch = self.examples.n // examples_per_step
        if self.steps_per_epoch < 1:
            raise UserError(f"only {self.examples.n} training examples fit the block of {seq_len} tokens: "
                            f"fewer than --examples-per-step {examples_per_step}")
        self.epoch, self.position, self.tokens_seen = 0, 0, 0
        self._orders = {}

    def _check_sizes(self, batch_size):
        group = batch_size * self.world_size
        if self.examples_per_step % group:
            raise UserError(f"--examples-per-step {self.examples_per_step} must be a multiple of --batch-size x "
                            f"GPUs = {batch_size} x {self.world_size} = {group}")

    def order(self, epoch):
        """Positions of the epoch's examples: a seeded shuffle, cut into steps, each step sorted by length (longest first)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            E, steps = self.examples_per_step, self.steps_per_epoch
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.examples.n)[:steps * E]
            perm = perm.reshape(steps, E)  # (steps, E)
            by_len = np.argsort(-self.examples.lengths[perm], axis=1, kind="stable")
            self._orders[epoch] = np.take_along_axis(perm, by_len, axis=1).reshape(-1)
        return self._orders[epoch]

    def next_batch(self):
        group_size = self.batch_size * self.world_size
        group = self.order(self.epoch)[self.position:self.position + group_size]  # (B * W,)
        mine = group[self.rank::self.world_size]  # (B,)
        self.tokens_seen += int((self.examples.lengths[group] - 1).sum())
        self.position += group_size
        if self.position >= self.steps_per_epoch * self.examples_per_step:
            self.epoch, self.position = self.epoch + 1, 0
        return self.examples.collate(mine, self.pad_multiple)

    def set_batch_size(self, batch_size):
        self._check_sizes(batch_size)
        self.batch_size = batch_size

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "tokens_seen": self.tokens_seen,
                "n_examples": self.examples.n, "examples_per_step": self.examples_per_step,
                "seq_len": self.examples.seq_len, "seed": self.seed, "fingerprint": self.examples.fingerprint}

    def load_state_dict(self, state):
        for key in ("n_examples", "examples_per_step", "seq_len", "fingerprint"):
            if key in state and state[key] != self.state_dict()[key]:
                raise UserError(f"the training data or batching changed since the checkpoint ({key} "
                                f"{state[key]} -> {self.state_dict()[key]}); resume with the same --data-dir, "
                                f"--block-size and --examples-per-step")
        if state.get("seed", self.seed) != self.seed:
            print(f"warning: data order seed changes from {state['seed']} to {self.seed} at resume", file=sys.stderr)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.tokens_seen = int(state.get("tokens_seen", 0))


class ValBatches:
    """The val examples (or a seeded subset of max_examples), sorted by length, dealt round-robin to ranks.

    batches() -> (x, y) of this rank, padded like training. The val loss (sum over response tokens
    of all ranks / their count) is the same for any world size. batch_size may be changed between
    evaluations (the trainer keeps it at its micro batch).
    """

    def __init__(self, split, seq_len, batch_size, rank=0, world_size=1, pad_multiple=64, max_examples=None,
                 seed=0):
        self.examples = _Examples(split, seq_len)
        self.batch_size, self.rank, self.world_size, self.pad_multiple = batch_size, rank, world_size, pad_multiple
        chosen = np.arange(self.examples.n)
        if max_examples is not None and max_examples < self.examples.n:
            chosen = np.sort(np.random.default_rng([seed, 7]).permutation(self.examples.n)[:max_examples])
        ordered = chosen[np.argsort(-self.examples.lengths[chosen], kind="stable")]
        self.n = len(ordered)
        self.mine = ordered[rank::world_size]

    def batches(self):
        for i in range(0, len(self.mine), self.batch_size):
            yield self.examples.collate(self.mine[i:i + self.batch_size], self.pad_multiple)


def held_out_prompts(split, count, max_prompt_len):
    """Prompts (the exact template strings) of `count` val examples spread over the split, whose
    prompt has at most max_prompt_len tokens; decoded from the training tokens themselves."""
    offsets = split["offsets"]
    eligible = []
    for i in range(len(offsets) - 1):
        s, e = int(offsets[i]), int(offsets[i + 1])
        n = prompt_length(split["loss_mask"][s:e])
        if 0 < n <= max_prompt_len:
            eligible.append((s, n))
    if not eligible or count <= 0:
        return []
    picks = sorted({int(round(v)) for v in np.linspace(0, len(eligible) - 1, min(count, len(eligible)))})
    return [decode(split["tokens"][s:s + n].tolist()) for s, n in (eligible[i] for i in picks)]


def make_answer_hook(prompts, max_new_tokens, every=None, seed=0):
    """train_gpt2.make_sample_hook with greedy decoding; the shared preamble is cut from the logged text."""
    inner = make_sample_hook(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0, every=every, seed=seed)

    def hook(trainer):
        out = dict(inner(trainer) or {})
        if out.get("samples"):
            out["samples"] = [s[len(PREAMBLE):] if s.startswith(PREAMBLE) else s for s in out["samples"]]
        return out

    return hook


# ====================================================================== models in

def load_resume_checkpoint(out_dir):
    """{out_dir}/last.pt, checked to be a fine-tuning run's training state."""
    path = os.path.join(out_dir, LAST_NAME)
    if not os.path.isfile(path):
        raise UserError(f"--init-from resume: no {path} (nothing to resume in --out-dir {out_dir})")
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "sft":
        raise UserError(f"--init-from resume: {path} is a {ckpt['kind']!r} checkpoint, not a fine-tuning run")
    return ckpt


def lora_config_from_args(args):
    """LoRAConfig from --lora-* flags, or None for full fine-tuning (no --lora-rank)."""
    if args.lora_rank is None:
        return None
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=parse_targets(args.lora_targets))


def load_initial_model(spec, dropout):
    """--init-from other than resume: our checkpoint, an OpenAI GPT-2 name or an HF folder (train_gpt2.load_model)."""
    if spec == "scratch":
        raise UserError("--init-from scratch: fine-tuning starts from a trained model (a checkpoint, "
                        f"{', '.join(PRETRAINED_CONFIGS)}, an HF GPT-2 folder, or resume)")
    model, _ = load_model(spec, dropout=dropout)
    model.train()
    if model.config.vocab_size < N_VOCAB:
        raise UserError(f"--init-from {spec}: its vocabulary has {model.config.vocab_size} ids, fewer than "
                        f"GPT-2's {N_VOCAB}: it cannot read the instruction data")
    return model


# ====================================================================== the trainer

class SFTTrainer(Trainer):
    """train_gpt2.Trainer plus the fine-tuning policy: last.pt for resume, ckpt.pt (+ adapter.pt) for the
    best val loss, a step-0 val loss, and throughput in real (unpadded) tokens."""

    def __init__(self, model, config, train_data, val_data=None, *, lora=None, base=None, steps_per_epoch=None,
                 **kw):
        super().__init__(model, config, train_data, val_data, kind="sft", **kw)
        self.lora, self.base, self.steps_per_epoch = lora, base, steps_per_epoch
        self._tokens_mark = None

    # checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, path=None, metrics=None):
        """The periodic / final / on-signal checkpoint: {out_dir}/last.pt (resume state)."""
        return super().save_checkpoint(path or os.path.join(self.cfg.out_dir, LAST_NAME), metrics)

    def save_best(self):
        """{out_dir}/ckpt.pt: inference-ready weights (LoRA merged), no optimizer; LoRA: adapter.pt too."""
        if not self.is_main:
            return None
        state = merged_state_dict(self.raw_model) if has_lora(self.raw_model) else self.raw_model.state_dict()
        path = write_checkpoint(
            os.path.join(self.cfg.out_dir, BEST_NAME), kind="sft", model_state=state, config=self.model_config,
            step=self.step, optimizer=None, train_state=self.train_state(), rng=None, args=self.args,
            metrics=dict(self.metrics))
        return path

    # evaluation ---------------------------------------------------------------------------

    def evaluate(self):
        """Val loss + hooks (Trainer.evaluate); a new best val loss is saved as ckpt.pt."""
        if self.val_data is not None:
            self.val_data.batch_size = self.micro_batch
        out = super().evaluate()
        loss = out.get("val_loss")
        if loss is not None:
            if loss < self.metrics.get("best_val_loss", float("inf")):
                self.metrics.update(best_val_loss=loss, best_step=self.step)
                self.save_best()
            out["best_val_loss"] = self.metrics["best_val_loss"]
        return out

    def _evaluate_initial(self):
        """Step 0: the initial model's val loss (and answers), logged; not a candidate for ckpt.pt."""
        if self.val_data is not None:
            self.val_data.batch_size = self.micro_batch
        out = Trainer.evaluate(self)
        if "val_loss" in out:
            self.metrics["initial_val_loss"] = out["val_loss"]
        record = {"step": 0, **{k: v for k, v in out.items() if isinstance(v, float)}}
        self._print(record)
        self._write_log(record)

    def fit(self):
        self._tokens_mark = self.train_data.state_dict().get("tokens_seen")
        if self.is_main:
            os.makedirs(self.cfg.out_dir, exist_ok=True)
        if self.step == 0 and self.cfg.eval_interval > 0:
            self._evaluate_initial()
        metrics = super().fit()
        if not metrics.get("stopped") and "best_step" not in self.metrics and self.step >= self.cfg.max_steps:
            self.save_best()  # no val loss was ever measured: the final model is the one to use
            self.metrics["best_step"] = self.step
        return metrics

    # logging ------------------------------------------------------------------------------

    def _train_record(self, loss, norm, steps, seconds):
        """Trainer's record with tokens_per_sec (and MFU) counted over real tokens, not padding; + epoch."""
        rec = super()._train_record(loss, norm, steps, seconds)
        seen = self.train_data.state_dict().get("tokens_seen")
        if seen is not None and self._tokens_mark is not None:
            real = (seen - self._tokens_mark) / max(seconds, 1e-9)
            if "mfu" in rec and rec["tokens_per_sec"] > 0:
                rec["mfu"] *= real / rec["tokens_per_sec"]
            rec["tokens_per_sec"] = real
        self._tokens_mark = seen
        if self.steps_per_epoch:
            rec["epoch"] = round(self.step / self.steps_per_epoch, 3)
        return rec


# ====================================================================== CLI

def build_parser():
    p = argparse.ArgumentParser(
        description="Instruction-tune GPT-2 on prepare_dolly.py output (full fine-tuning or LoRA; python or "
                    "torchrun; bf16, exact resume). Writes OUT_DIR/ckpt.pt (best val loss, for inference), "
                    "last.pt (resume), adapter.pt (LoRA), log.jsonl, samples.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument_group("data and output")
    a.add_argument("--data-dir", default="data/dolly", help="prepare_dolly.py output: train.npz, val.npz, meta.json")
    a.add_argument("--out-dir", default="out/dolly", help="ckpt.pt (best), last.pt, adapter.pt, log.jsonl, ...")
    a.add_argument("--init-from", required=True,
                   help="our checkpoint (file or folder; pretrain or sft) | gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "(HF hub, online) | a local HF GPT-2 folder | resume (OUT_DIR/last.pt: continue exactly)")
    a.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT_DIR that holds a previous run (its run files are removed)")
    m = p.add_argument_group("model")
    m.add_argument("--block-size", type=int, default=None,
                   help="longest example (tokens, +1); longer ones are left out (default: the model's block size)")
    m.add_argument("--dropout", type=float, default=None, help="dropout (default: the initial model's)")
    lo = p.add_argument_group("LoRA (off unless --lora-rank is given)")
    lo.add_argument("--lora-rank", type=int, default=None, help="adapter rank r (e.g. 8); the base stays frozen")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale is alpha / r")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    lo.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated Linear layers: c_attn, attn.c_proj, mlp.c_fc (= c_fc), mlp.c_proj; "
                         "c_proj = both projections")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=32, help="micro batch: examples per GPU per micro-step")
    o.add_argument("--examples-per-step", type=int, default=32,
                   help="examples per optimizer step (all GPUs); gradient accumulation fills the gap")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=3, help="passes over the training examples")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    o.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warmup (default: {100 * WARMUP_FRACTION:g}%% of the steps)")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {DEFAULT_LR:g}; with LoRA {DEFAULT_LORA_LR:g})")
    o.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=1337, help="data order, LoRA init, dropout")
    o.add_argument("--pad-multiple", type=int, default=64,
                   help="pad each micro-batch to a multiple of this many tokens (the block size: one fixed shape)")
    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--eval-interval", type=int, default=None,
                   help=f"steps between evaluations (default: {EVALS_PER_EPOCH} per epoch; 0: none)")
    e.add_argument("--eval-examples", type=int, default=None, help="val examples per evaluation (default: all)")
    e.add_argument("--sample-count", type=int, default=4, help="held-out val instructions answered at evaluations")
    e.add_argument("--sample-prompt", action="append", default=None, metavar="INSTRUCTION",
                   help="also answer this instruction at evaluations (repeatable)")
    e.add_argument("--sample-tokens", type=int, default=128, help="tokens per answer (greedy; 0: no answers)")
    e.add_argument("--sample-interval", type=int, default=None,
                   help="answers only at evaluations whose step is a multiple of this (default: every one)")
    e.add_argument("--ckpt-interval", type=int, default=None,
                   help="steps between last.pt checkpoints (default: the eval interval; always at the end)")
    e.add_argument("--log-interval", type=int, default=10, help="steps between log lines (the only host syncs)")
    e.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, schedule unchanged (continue with --init-from resume)")
    e.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write OUT_DIR/loss.png")
    add_system_args(p, kernels=False)
    return p


RESUME_FIXED = ("init_from", "out_dir", "overwrite", "stop_at_step")  # never taken from the checkpoint


def parse_args(argv=None):
    """Parse; for --init-from resume, flags not given again default to the run's own (from last.pt).

    Returns (args, resume checkpoint or None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init_from != "resume":
        return args, None
    ckpt = load_resume_checkpoint(args.out_dir)
    cli = (ckpt.get("args") or {}).get("cli") or {}
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in cli.items() if k in dests and k not in RESUME_FIXED})
    return parser.parse_args(argv), ckpt


def check_args(args):
    for name in ("batch_size", "examples_per_step", "log_interval", "pad_multiple"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_interval", "ckpt_interval", "eval_examples", "sample_count", "sample_tokens",
                 "prefetch"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_steps is None and not args.epochs > 0:
        raise UserError(f"--epochs must be > 0, got {args.epochs}")
    if args.block_size is not None and args.block_size < 2:
        raise UserError(f"--block-size must be >= 2, got {args.block_size}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.min_lr < 0 or args.weight_decay < 0:
        raise UserError("--min-lr and --weight-decay must be >= 0")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.eval_examples == 0:
        raise UserError("--eval-examples must be >= 1 (use --eval-interval 0 for no evaluation)")
    return lora_config_from_args(args)  # checks the LoRA flags


def check_out_dir(args, dist):
    """A fresh run refuses an OUT_DIR holding a previous run, unless --overwrite (then its run files go)."""
    if args.init_from == "resume":
        return
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(args.out_dir, n))]
    if found and not args.overwrite:
        raise UserError(f"--out-dir {args.out_dir} holds a previous run ({', '.join(found)}): continue it with "
                        f"--init-from resume, or pass --overwrite to start afresh")
    if dist.enabled:
        torch.distributed.barrier()  # every rank has looked before rank 0 deletes
    if found and dist.is_main:
        for name in found:
            os.remove(os.path.join(args.out_dir, name))


def resolve_schedule(args, steps_per_epoch):
    """Fill the defaults that depend on the data and on LoRA: max_steps, warmup, lr, eval/ckpt intervals."""
    r = argparse.Namespace(**vars(args))
    if r.max_steps is None:
        r.max_steps = max(1, int(round(r.epochs * steps_per_epoch)))
    r.epochs = r.max_steps / steps_per_epoch
    if r.warmup_steps is None:
        r.warmup_steps = int(round(WARMUP_FRACTION * r.max_steps))
    if r.lr is None:
        r.lr = DEFAULT_LORA_LR if r.lora_rank is not None else DEFAULT_LR
    if r.eval_interval is None:
        r.eval_interval = max(1, steps_per_epoch // EVALS_PER_EPOCH)
    if r.ckpt_interval is None:
        r.ckpt_interval = r.eval_interval
    return r


def main(argv=None):
    args, resume_ckpt = parse_args(argv)
    lora_cfg = check_args(args)
    dist = setup_distributed(args.device)
    try:
        return _run(args, dist, resume_ckpt, lora_cfg)
    finally:
        teardown_distributed(dist)


def _run(args, dist, resume_ckpt, lora_cfg):
    say = print if dist.is_main else (lambda *a, **k: None)
    data = load_instruction_data(args.data_dir)
    torch.manual_seed(args.seed)
    if resume_ckpt is not None:
        base = (resume_ckpt.get("args") or {}).get("base")
        model = model_from_checkpoint(resume_ckpt, LAST_NAME).train()
    else:
        base = args.init_from if args.init_from in PRETRAINED_CONFIGS else os.path.abspath(args.init_from)
        model = load_initial_model(args.init_from, args.dropout)
        if lora_cfg is not None:
            apply_lora(model, lora_cfg)
    say(describe_memory(model))
    seq_len = args.block_size or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--block-size {seq_len} exceeds the model's block size {model.config.block_size}")

    train_data = InstructionBatches(data["train"], seq_len, args.batch_size, args.examples_per_step, dist.rank,
                                    dist.world_size, args.seed, args.pad_multiple)
    r = resolve_schedule(args, train_data.steps_per_epoch)
    val_data = None
    n_val = len(data["val"]["offsets"]) - 1
    if r.eval_interval > 0 and n_val > 0:
        val_data = ValBatches(data["val"], seq_len, args.batch_size, dist.rank, dist.world_size, args.pad_multiple,
                              args.eval_examples, args.seed)
        if val_data.n == 0:
            val_data = None
    hooks = []
    if r.sample_tokens > 0 and r.eval_interval > 0:
        prompts = held_out_prompts(data["val"], r.sample_count, model.config.block_size - r.sample_tokens)
        prompts += [format_prompt(p) for p in (r.sample_prompt or [])]
        if prompts:
            hooks.append(make_answer_hook(prompts, r.sample_tokens, every=r.sample_interval, seed=r.seed))
    if resume_ckpt is None:
        check_out_dir(args, dist)
    else:
        if dist.is_main:
            warn_resume_differences(r, resume_ckpt)

    ex = train_data.examples
    say(f"fine-tuning ({'LoRA ' + str(lora_cfg.to_dict()) if lora_cfg else 'full'}) from {base}: "
        f"{ex.n:,} train examples ({ex.n_too_long} longer than {seq_len + 1} tokens left out), "
        f"{val_data.n if val_data else 0:,} val; {r.examples_per_step} examples/step, {train_data.steps_per_epoch} "
        f"steps/epoch, {r.max_steps} steps ({r.epochs:.2f} epochs), lr {r.lr:g} (warmup {r.warmup_steps}), "
        f"padding to multiples of {r.pad_multiple}", flush=True)

    cfg = TrainConfig(
        out_dir=r.out_dir, batch_size=r.batch_size, seq_len=seq_len, total_batch_size=r.examples_per_step * seq_len,
        max_steps=r.max_steps, warmup_steps=r.warmup_steps, lr=r.lr, min_lr=r.min_lr, weight_decay=r.weight_decay,
        grad_clip=r.grad_clip, eval_interval=r.eval_interval, ckpt_interval=r.ckpt_interval,
        log_interval=r.log_interval, stop_at_step=r.stop_at_step, device=r.device, dtype=r.dtype,
        compile=dist.device.type == "cuda" if r.compile is None else r.compile, compile_mode=r.compile_mode,
        compile_fullgraph=r.compile_fullgraph, compile_backend=r.compile_backend, prefetch=r.prefetch,
        auto_shrink_batch=not r.no_auto_shrink, plot=r.plot,
    )
    saved_args = {**vars(r), "base": base, "cli": vars(args),
                  "lora": lora_cfg.to_dict() if lora_cfg else None, "data_meta_source": data["meta"].get("source")}
    trainer = SFTTrainer(model, cfg, train_data, val_data, dist=dist, eval_hooks=hooks, args=saved_args,
                         lora=lora_cfg, base=base, steps_per_epoch=train_data.steps_per_epoch)
    if resume_ckpt is not None:
        trainer.restore(resume_ckpt, load_weights=False)  # weights came with the model
    return trainer.fit()


if __name__ == "__main__":
    run_cli(main)
