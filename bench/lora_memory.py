"""
Gradient + AdamW memory of full fine-tuning vs LoRA for a GPT shape (GPT-2 124M by default), measured
on CPU after one real optimizer step each. Activations are not counted: LoRA does not reduce them.

    python bench/lora_memory.py
    python bench/lora_memory.py --n-layer 24 --n-head 16 --n-embd 1024 --lora-rank 16

Prints a table; the last line is JSON.
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import UserError, run_cli  # noqa: E402
from lora import DEFAULT_TARGETS, LoRAConfig, mib, apply_lora, parse_targets, training_state_bytes  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def measure_training_state_bytes(model, seq_len=16):
    """Measured, not computed: one AdamW step on a short random batch, then the bytes of every .grad
    and every optimizer-state tensor. Leaves the model's gradients cleared (weights do change)."""
    device = next(model.parameters()).device
    opt = model.configure_optimizers(0.0, 1e-5, device_type=device.type)
    x = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    _, loss = model(x, x)
    loss.backward()
    grad = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    model.zero_grad(set_to_none=True)
    return {"grad_bytes": grad, "optimizer_bytes": state, "bytes": grad + state}


def build_parser():
    p = argparse.ArgumentParser(
        description="Measure the gradient + AdamW memory of full fine-tuning vs LoRA for a GPT shape "
                    "(CPU, one real optimizer step each). Prints a table; the last line is JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
    except ValueError as e:
        raise UserError(str(e)) from None
    cfg = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0, targets=parse_targets(args.lora_targets))
    torch.manual_seed(0)
    rows = {}
    model = GPT(config)
    rows["full"] = {**training_state_bytes(model), "measured": measure_training_state_bytes(model)}
    apply_lora(model, cfg)
    rows["lora"] = {**training_state_bytes(model), "measured": measure_training_state_bytes(model)}
    print(f"{'':<6}{'trainable':>14}{'grads':>12}{'AdamW state':>14}{'total':>12}   (measured after one step)")
    for name, r in rows.items():
        m = r["measured"]
        print(f"{name:<6}{r['trainable']:>14,}{mib(m['grad_bytes']):>12}{mib(m['optimizer_bytes']):>14}"
              f"{mib(m['bytes']):>12}")
    saved = rows["full"]["measured"]["bytes"] - rows["lora"]["measured"]["bytes"]
    print(f"LoRA rank {cfg.rank} on {', '.join(cfg.targets)} saves {mib(saved)} of gradients + optimizer state "
          f"({100 * saved / rows['full']['measured']['bytes']:.1f}%); activations are not reduced")
    result = {"config": config.to_dict(), "lora": cfg.to_dict(), "saved_bytes": saved,
              **{k: {"trainable": r["trainable"], "total": r["total"], **r["measured"]} for k, r in rows.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
