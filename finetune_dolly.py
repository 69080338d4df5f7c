"""Instruction-tune GPT-2 on prepare_dolly.py output (full fine-tuning, or LoRA; README, step 4): train_gpt2's
loop on rows of one whole example each, padded, never packed (packed examples would attend to each other).
"""

import functools
import os
import zlib

from cli import help_requested, run_cli
from train_flags import DEFAULT_LORA_LR, DEFAULT_LR, finetune_parser

if __name__ == "__main__" and help_requested():
    finetune_parser().parse_args()  # --help answers here, before the ~2 s import of torch below

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import UserError, parse_json  # noqa: E402
from device import setup_distributed, teardown_distributed  # noqa: E402
from lora import LoRAConfig, apply_lora, describe_memory, parse_targets  # noqa: E402
from model import PRETRAINED_CONFIGS  # noqa: E402
from prepare_dolly import load_split  # noqa: E402
from prompt import TEMPLATE_VERSION, format_prompt  # noqa: E402
from tokenizer import EOT_ID, N_VOCAB, decode  # noqa: E402
from train_gpt2 import initial_model, parse_args, run  # noqa: E402

WARMUP_FRACTION = 0.03
EVALS_PER_EPOCH = 4
PAD_ID = EOT_ID  # what padding positions hold in x (never attended to by real tokens: causal)


def load_instruction_data(data_dir):
    """{train, val} splits (prepare_dolly.load_split) of a prepare_dolly.py output folder, its template checked."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{meta_path}: not found (--data-dir, default data/dolly): make the folder with "
                        f"python prepare_dolly.py --out-dir {data_dir}")
    with open(meta_path, "rb") as f:
        version = parse_json(f.read(), meta_path).get("template_version")
    if version != TEMPLATE_VERSION:
        raise UserError(f"{data_dir} was prepared with prompt template version {version}, but this code uses "
                        f"version {TEMPLATE_VERSION}: run prepare_dolly.py again")
    return {name: load_split(os.path.join(data_dir, f"{name}.npz")) for name in ("train", "val")}


def example_rows(tokens, loss_mask):
    """One example (L,) -> x (L-1,) inputs and y (L-1,) targets: token t+1 where loss_mask[t+1] is 1, else -1."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[:-1], np.where(np.asarray(loss_mask[1:]) == 1, tokens[1:], -1)


def prompt_length(loss_mask):
    """Tokens before the first trained one (the prompt)."""
    return int(np.argmax(np.asarray(loss_mask) == 1))


class Examples:
    """The examples of one split that fit the block: their starts and lengths, and a fingerprint of the data."""

    def __init__(self, split, seq_len, pad_multiple):
        self.tokens, self.mask, offsets = split["tokens"], split["loss_mask"], split["offsets"]
        lengths = np.diff(offsets)  # (n_all,)
        fits = np.flatnonzero(lengths <= seq_len + 1)  # x holds L - 1 tokens
        self.n, self.n_too_long = len(fits), len(lengths) - len(fits)
        self.starts, self.lengths = offsets[:-1][fits], lengths[fits]  # (n,), (n,)
        self.seq_len, self.pad_multiple = seq_len, pad_multiple
        self.fingerprint = zlib.crc32(self.tokens.tobytes(), zlib.crc32(offsets.tobytes()))

    def collate(self, idx):
        """Examples idx -> x, y (len(idx), T) int64, right-padded (x: PAD_ID, y: -1) to the longest row,
        rounded up to pad_multiple and at most seq_len."""
        longest = int(self.lengths[idx].max()) - 1
        T = min(self.seq_len, -(-longest // self.pad_multiple) * self.pad_multiple)
        x = np.full((len(idx), T), PAD_ID, dtype=np.int64)
        y = np.full((len(idx), T), -1, dtype=np.int64)
        for k, i in enumerate(idx):
            s, L = int(self.starts[i]), int(self.lengths[i])
            x[k, :L - 1], y[k, :L - 1] = example_rows(self.tokens[s:s + L], self.mask[s:s + L])
        return torch.from_numpy(x), torch.from_numpy(y)


class InstructionBatches:
    """Training rows for train_gpt2.Trainer: batch(step) -> this rank's whole padded examples of the step.
    Every epoch is a seeded shuffle cut into steps of E examples, each step sorted by length (similar rows
    share a micro-batch; a step stays a uniform draw); rank r takes rows r, r + W, ... of it, so DDP trains
    on the same examples as one process. The last n mod E of each shuffle sit that epoch out."""

    def __init__(self, split, seq_len, examples_per_step, rank=0, world_size=1, seed=0, pad_multiple=64):
        self.examples, self.rows, self.seq_len = Examples(split, seq_len, pad_multiple), examples_per_step, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = self.examples.n // examples_per_step
        if self.steps_per_epoch < 1:
            raise UserError(f"only {self.examples.n} training examples fit the block of {seq_len} tokens: "
                            f"fewer than --examples-per-step {examples_per_step}")
        self.signature = {"n_examples": self.examples.n, "examples_per_step": examples_per_step,
                          "seq_len": seq_len, "fingerprint": self.examples.fingerprint}

    @functools.lru_cache(maxsize=2)
    def order(self, epoch):
        """(steps, E) example positions of an epoch: a seeded shuffle cut into steps, each sorted longest first."""
        E, steps = self.rows, self.steps_per_epoch
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.examples.n)[:steps * E].reshape(steps, E)
        by_len = np.argsort(-self.examples.lengths[perm], axis=1, kind="stable")
        return np.take_along_axis(perm, by_len, axis=1)

    def batch(self, step):
        epoch, s = divmod(step, self.steps_per_epoch)
        return self.examples.collate(self.order(epoch)[s][self.rank::self.world_size])


def val_batches(split, seq_len, batch_size, rank=0, world_size=1, pad_multiple=64, max_examples=None, seed=0):
    """The val examples (or a seeded subset), sorted by length, dealt round-robin to ranks, padded like training:
    the val loss (sum over response tokens of all ranks / their count) is the same for any world size."""
    examples = Examples(split, seq_len, pad_multiple)
    chosen = np.sort(np.random.default_rng([seed, 7]).permutation(examples.n)[:max_examples])  # None: all
    mine = chosen[np.argsort(-examples.lengths[chosen], kind="stable")][rank::world_size]
    return [examples.collate(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]


def held_out_prompts(split, count, max_prompt_len):
    """The prompts (decoded from the tokens) of `count` val examples spread over the split, of <= max_prompt_len."""
    bounds = split["offsets"].tolist()
    prompts = [(s, prompt_length(split["loss_mask"][s:e])) for s, e in zip(bounds, bounds[1:])]
    eligible = [(s, n) for s, n in prompts if 0 < n <= max_prompt_len]
    picks = sorted({int(round(v)) for v in np.linspace(0, len(eligible) - 1, min(count, len(eligible)))})
    return [decode(split["tokens"][s:s + n].tolist()) for s, n in (eligible[i] for i in picks)]


def main(argv=None):
    args, ckpt = parse_args(finetune_parser(), argv, "sft")
    if args.epochs is not None and args.max_steps is not None:
        raise UserError("give --epochs or --max-steps, not both")
    if args.init_from == "scratch":
        raise UserError("--init-from: fine-tuning starts from a trained model (a checkpoint, "
                        f"{', '.join(PRETRAINED_CONFIGS)}, an HF GPT-2 folder, or resume)")
    if args.init_from not in ("resume", *PRETRAINED_CONFIGS) and not os.path.exists(args.init_from):
        raise UserError(f"model not found: {args.init_from} (--init-from, default out/pretrain): make it with python "
                        f"train_gpt2.py --out-dir {args.init_from}, or pass gpt2 or a local HF GPT-2 folder")
    lora = None if args.lora_rank is None else LoRAConfig(  # None: full fine-tuning
        rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=parse_targets(args.lora_targets))
    dist = setup_distributed(args.device)
    try:
        data = load_instruction_data(args.data_dir)
        model = initial_model(args, ckpt)
        if model.config.vocab_size < N_VOCAB:
            raise UserError(f"--init-from {args.init_from}: its vocabulary has {model.config.vocab_size} ids, fewer "
                            f"than GPT-2's {N_VOCAB}: it cannot read the instruction data")
        if lora is not None and ckpt is None:
            apply_lora(model, lora)
        args.block_size = args.block_size or model.config.block_size
        train = InstructionBatches(data["train"], args.block_size, args.examples_per_step, dist.rank,
                                   dist.world_size, args.seed, args.pad_multiple)
        # the schedule's defaults depend on the data and on LoRA
        spe = train.steps_per_epoch
        args.max_steps, args.epochs = args.max_steps or max(1, round((args.epochs or 3) * spe)), None
        args.warmup_steps = round(WARMUP_FRACTION * args.max_steps) if args.warmup_steps is None else args.warmup_steps
        args.lr = args.lr or (DEFAULT_LORA_LR if lora else DEFAULT_LR)
        args.eval_interval = max(1, spe // EVALS_PER_EPOCH) if args.eval_interval is None else args.eval_interval
        args.ckpt_interval = args.eval_interval if args.ckpt_interval is None else args.ckpt_interval
        val = val_batches(data["val"], args.block_size, args.batch_size, dist.rank, dist.world_size,
                          args.pad_multiple, args.eval_examples, args.seed) if args.eval_interval else []
        prompts = held_out_prompts(data["val"], args.sample_count, model.config.block_size - args.sample_tokens)
        prompts += [format_prompt(p) for p in args.sample_prompt or []]
        if dist.is_main:
            ex = train.examples
            print(f"fine-tuning ({'LoRA ' + str(lora.to_dict()) if lora else 'full'}) from {args.init_from}: "
                  f"{ex.n:,} train examples ({ex.n_too_long} longer than {args.block_size + 1} tokens left out), "
                  f"{sum(len(x) for x, _ in val) * dist.world_size:,} val; {spe} steps an epoch, {args.max_steps} "
                  f"steps (warmup {args.warmup_steps}); {describe_memory(model)}", flush=True)
        return run(args, dist, ckpt, model, train, val, "sft", prompts=prompts)
    finally:
        teardown_distributed(dist)


if __name__ == "__main__":
    run_cli(main)
