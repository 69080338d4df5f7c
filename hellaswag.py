"""HellaSwag: score a GPT on the validation set. A candidate ending's score is the model's loss on its tokens
given the context (encode(ctx) + encode(" " + ending)): acc picks the lowest sum, acc_norm the lowest mean
per token (the figure build-nanogpt reports, about 0.2955 for OpenAI GPT-2 124M).

    python hellaswag.py --model gpt2|CKPT|HF_FOLDER --file hellaswag_val.jsonl.xz [--limit N]
"""

import itertools
import json
import os

from cli import CLIParser, DefaultsFormatter, help_requested, run_cli


def build_parser():
    p = CLIParser(description="Score a GPT on HellaSwag (acc_norm and acc).", formatter_class=DefaultsFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint file or folder, OpenAI GPT-2 name (gpt2, gpt2-medium, ...) or HF folder")
    p.add_argument("--file", required=True, help="HellaSwag rows (.jsonl, .jsonl.gz, .jsonl.xz)")
    p.add_argument("--limit", type=int, help="score only the first N examples (default: all)")
    p.add_argument("--batch-examples", type=int, default=8, help="examples per forward pass")
    p.add_argument("--device", default="auto", help="cuda, cpu, mps, ... (auto: cuda when present)")
    p.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on CUDA), float32, bfloat16")
    return p


if __name__ == "__main__" and help_requested():
    build_parser().parse_args()  # --help answers here, before the ~2 s import of torch below

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402

from checkpoint import load_model  # noqa: E402
from common import UserError, iter_jsonl  # noqa: E402
from device import autocast, pick_device, pick_dtype  # noqa: E402
from model import GPT2_VOCAB  # noqa: E402
from tokenizer import encode  # noqa: E402

N_ENDINGS = 4


def load_examples(path, limit=None):
    """Rows with `ctx` (HellaSwag's ctx_a + ctx_b), 4 `endings` and an int `label` in 0..3."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file not found: {path}")
    examples = []
    for lineno, row in itertools.islice(iter_jsonl(path), limit):
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) != N_ENDINGS \
                or not all(isinstance(e, str) for e in endings):
            raise UserError(f"{path}:{lineno}: expected `ctx` (text) and `endings` (a list of {N_ENDINGS} texts)")
        if str(label) not in ("0", "1", "2", "3"):  # HellaSwag's files hold ints; "2" reads as 2 too
            raise UserError(f"{path}:{lineno}: `label` must be an integer 0..3, got {label!r}")
        examples.append({"ctx": ctx, "endings": endings, "label": int(label)})
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples")
    return examples


@torch.no_grad()
def score_examples(model, examples, device, batch_examples=8, autocast_dtype=None):
    """Ending losses for each example (the model in eval mode): list of (mean_losses[4], sum_losses[4])."""
    device, out = torch.device(device), []
    for i in range(0, len(examples), batch_examples):
        rows, starts = [], []  # ctx + ending for every ending, and where the ending starts
        for ex in examples[i:i + batch_examples]:
            ctx = encode(ex["ctx"])
            for ending in ex["endings"]:
                row = ctx + encode(" " + ending)
                cut = max(0, len(row) - model.config.block_size)  # longer than the block: cut from the left
                rows.append(row[cut:])
                starts.append(max(1, len(ctx) - cut))  # position 0 is never a target
        tokens = pad_sequence([torch.tensor(r) for r in rows], batch_first=True)  # (N, L), right-padded
        targets = pad_sequence([torch.tensor([-1] * s + r[s:]) for r, s in zip(rows, starts)], batch_first=True,
                               padding_value=-1)  # the ending's tokens, -1 elsewhere
        tokens, targets = tokens.to(device), targets[:, 1:].to(device)  # predict token t+1 from position t
        with autocast(device, autocast_dtype):
            logits, _ = model(tokens)  # (N, L, V); causal, so right padding changes nothing before it
        logits = logits[:, :-1, :GPT2_VOCAB].float().flatten(0, 1)  # (N (L-1), V)
        losses = F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction="none")  # 0 where ignored
        summed = losses.view(len(rows), -1).sum(1)  # (N,)
        mean = summed / (targets != -1).sum(1).clamp_min(1)
        out += zip(mean.view(-1, N_ENDINGS).tolist(), summed.view(-1, N_ENDINGS).tolist())  # per example
    return out


def evaluate(model, examples, device, rank=0, world_size=1, batch_examples=8, autocast_dtype=None):
    """acc_norm and acc of `model`; rank r scores examples r::world_size; totals summed over ranks."""
    mine = examples[rank::world_size]
    correct_norm = correct = 0
    for ex, (mean, summed) in zip(mine, score_examples(model, mine, device, batch_examples, autocast_dtype)):
        correct_norm += int(min(range(N_ENDINGS), key=mean.__getitem__) == ex["label"])
        correct += int(min(range(N_ENDINGS), key=summed.__getitem__) == ex["label"])
    counts = torch.tensor([correct_norm, correct, len(mine)], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    correct_norm, correct, n = (int(v) for v in counts.tolist())
    return {"acc_norm": correct_norm / max(n, 1), "acc": correct / max(n, 1), "n": n}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    examples = load_examples(args.file, args.limit)
    model, _ = load_model(args.model, device)
    result = evaluate(model, examples, device, batch_examples=args.batch_examples,
                      autocast_dtype=pick_dtype(args.dtype, device))
    print(f"HellaSwag {result['n']} examples: acc_norm {result['acc_norm']:.4f}  acc {result['acc']:.4f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
