"""The flags of train_gpt2.py and finetune_dolly.py, defined once and torch-free (--help answers at once):
add_train_args holds those both share; each parser adds its own and sets its defaults."""

import argparse

from cli import CLIParser, DefaultsFormatter, bounded

MUON_LR_RATIO = 100 / 3  # Muon's default peak LR per unit of --lr: 0.02 at the pretraining lr 6e-4
# fine-tuning: HF's lr for GPT-2, 12x below the pretraining peak, so the pretrained features survive ~3 epochs;
# LoRA's adapters start at zero and are low-rank: they need a ~10x larger step
DEFAULT_LR, DEFAULT_LORA_LR = 5e-5, 3e-4
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # LoRA on every Linear of every block (QLoRA: all layers is best)


def add_train_args(p):
    a = p.add_argument_group("data and output")
    a.add_argument("--data-dir", help="the training data folder")
    a.add_argument("--out-dir", help="checkpoints, log.jsonl, samples.jsonl, loss.png")
    a.add_argument("--init-from", help="scratch | resume (continue OUT_DIR's run exactly; flags not given again are "
                   "the run's) | our checkpoint (file or folder) | gpt2, gpt2-medium, ... | a local HF GPT-2 folder")
    a.add_argument("--overwrite", action="store_true", help="start afresh in an OUT_DIR holding a run (its files go)")
    a.add_argument("--block-size", type=bounded(int, 2), help="sequence length (tokens)")
    a.add_argument("--dropout", type=float, help="dropout (default: 0, or the initial model's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=bounded(int, 1), help="micro batch: sequences per GPU per micro-step")
    o.add_argument("--max-steps", type=bounded(int, 1), help="optimizer steps")
    o.add_argument("--warmup-steps", type=bounded(int, 0), help="linear LR warmup steps")
    o.add_argument("--optimizer", choices=("adamw", "muon"), help="adamw: AdamW for every weight | muon: Muon for the "
                   "blocks' matrices (with LoRA: the adapters), AdamW (--lr, --weight-decay) for the rest")
    o.add_argument("--lr", type=bounded(float, 0, inclusive=False), help="AdamW's peak learning rate")
    o.add_argument("--min-lr", type=bounded(float, 0),
                   help="AdamW's LR at the end of the cosine (Muon's ends at the same fraction of its peak)")
    o.add_argument("--weight-decay", type=bounded(float, 0), help="AdamW's weight decay (on >= 2-D weights)")
    o.add_argument("--muon-lr", type=bounded(float, 0, inclusive=False),
                   help=f"Muon's peak learning rate (default: --lr x {MUON_LR_RATIO:.4g}, 0.02 at lr 6e-4)")
    o.add_argument("--muon-weight-decay", type=bounded(float, 0), default=0.0, help="Muon's decoupled weight decay")
    o.add_argument("--grad-clip", type=bounded(float, 0), default=1.0, help="gradient norm clip (0: none)")
    o.add_argument("--seed", type=int, default=1337, help="model init, data order, dropout, samples")
    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--eval-interval", type=bounded(int, 0), help="steps between evaluations (0: none)")
    e.add_argument("--ckpt-interval", type=bounded(int, 0), help="steps between checkpoints (0: only at the end)")
    e.add_argument("--log-interval", type=bounded(int, 1), default=10, help="steps between log lines (host syncs)")
    e.add_argument("--stop-at-step", type=bounded(int, 1),
                   help="checkpoint and exit after this step, schedule unchanged (continue with --init-from resume)")
    e.add_argument("--hellaswag", metavar="FILE", help="HellaSwag .jsonl[.xz] to score at evaluations")
    e.add_argument("--hellaswag-limit", type=bounded(int, 1), help="score the first N examples only")
    e.add_argument("--sample-prompt", action="append", help="prompt continued at evaluations (repeatable)")
    e.add_argument("--sample-tokens", type=bounded(int, 0), help="tokens per sample (0: no samples)")
    e.add_argument("--sample-temperature", type=bounded(float, 0), help="sampling temperature (0: greedy)")
    e.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write OUT_DIR/loss.png")
    e.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    e.add_argument("--wandb-project", default="gpt2-instruct")
    e.add_argument("--wandb-run", help="run name (default: wandb's)")
    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun picks cuda:LOCAL_RANK)")
    s.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "bf16", "float32", "fp32"),
                   help="autocast dtype (auto: bf16 on CUDA, else float32; float16 would need loss scaling)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on for CUDA)")
    s.add_argument("--prefetch", type=bounded(int, 0), default=4, help="steps loaded ahead in a thread (0: none)")
    return p


def pretrain_parser():
    p = CLIParser(description="Pretrain GPT-2 on token shards (python or torchrun; DDP, bf16, exact "
                              "resume).", formatter_class=DefaultsFormatter)
    add_train_args(p)
    m = p.add_argument_group("pretraining")
    m.add_argument("--n-layer", type=int, default=12, help="model shape (scratch)")
    m.add_argument("--n-head", type=int, default=12)
    m.add_argument("--n-embd", type=int, default=768)
    m.add_argument("--vocab-size", type=int, default=50304, help="embedding rows (50257 padded for speed)")
    m.add_argument("--total-batch-size", type=bounded(int, 1), default=524288,
                   help="tokens per optimizer step (all GPUs); gradient accumulation fills the gap")
    m.add_argument("--eval-steps", type=bounded(int, 0), default=20, help="val batches of --batch-size per evaluation")
    # muon: on one H100 it reached AdamW's 300-step val loss in 0.43x the time, at 96% of its tokens/s
    p.set_defaults(data_dir="data/fineweb", out_dir="out/pretrain", init_from="scratch", optimizer="muon",
                   block_size=1024, batch_size=64, max_steps=19073, warmup_steps=715, lr=6e-4, weight_decay=0.1,
                   eval_interval=250, ckpt_interval=1000, sample_tokens=48, sample_temperature=1.0)
    return p


def finetune_parser():
    p = CLIParser(description="Instruction-tune GPT-2 on prepare_dolly.py output (full fine-tuning or LoRA; python "
                  "or torchrun; bf16, exact resume). Writes OUT_DIR/ckpt.pt (best val loss, for inference), last.pt "
                  "(resume), log.jsonl, samples.jsonl.", formatter_class=DefaultsFormatter)
    add_train_args(p)
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--examples-per-step", type=bounded(int, 1), default=32,
                   help="examples per optimizer step (all GPUs); gradient accumulation fills the gap")
    f.add_argument("--epochs", type=bounded(float, 0, inclusive=False),
                   help="passes over the training examples (default 3; or --max-steps)")
    f.add_argument("--pad-multiple", type=bounded(int, 1), default=64,
                   help="pad rows to a multiple of this many tokens (the block size: one fixed shape)")
    f.add_argument("--eval-examples", type=bounded(int, 1), help="val examples per evaluation (default: all)")
    f.add_argument("--sample-count", type=bounded(int, 0), default=4, help="val instructions answered at evaluations")
    lo = p.add_argument_group("LoRA (off unless --lora-rank is given)")
    lo.add_argument("--lora-rank", type=bounded(int, 1), help="adapter rank r (e.g. 8); the base stays frozen")
    lo.add_argument("--lora-alpha", type=bounded(float, 0, inclusive=False), default=16.0, help="scale: alpha / r")
    lo.add_argument("--lora-dropout", type=bounded(float, 0, below=1), default=0.05, help="adapter input dropout")
    lo.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated Linear layers: c_attn, attn.c_proj, mlp.c_fc (= c_fc), mlp.c_proj; "
                         "c_proj = both projections")
    # adamw: Muon was measured on pretraining only; fine-tuning keeps the optimizer its LRs were tuned for
    p.set_defaults(data_dir="data/dolly", out_dir="out/dolly", init_from="out/pretrain", optimizer="adamw",
                   batch_size=32, min_lr=0.0, weight_decay=0.01, sample_tokens=128, sample_temperature=0.0)
    decided = {"lr": f"{DEFAULT_LR:g}, LoRA {DEFAULT_LORA_LR:g}", "max_steps": "3 epochs",
               "warmup_steps": "3%% of the steps", "eval_interval": "a quarter epoch", "block_size": "the model's",
               "ckpt_interval": "--eval-interval", "muon_lr": f"--lr x {MUON_LR_RATIO:.4g}"}
    for action in p._actions:  # the defaults the data and LoRA decide
        if action.dest in decided:
            action.help = action.help.split(" (default")[0] + f" (default: {decided[action.dest]})"
    return p
