"""LoRA (Hu et al. 2021): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, W and b frozen, B zero at first
(training starts from the base model exactly). W keeps its canonical name, so merged_state_dict (W + scale * B A)
is a plain GPT state dict. Only gradients and optimizer state shrink, not activations (BENCHMARKS.md)."""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from train_flags import DEFAULT_TARGETS


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = DEFAULT_TARGETS

    def __post_init__(self):  # rank, alpha and dropout are checked by their flags; find_targets checks the names
        object.__setattr__(self, "targets", tuple(self.targets))  # a checkpoint stores a list
        if not self.targets:
            raise UserError("--lora-targets is empty; name at least one layer, e.g. c_attn")

    def to_dict(self):
        return {**asdict(self), "targets": list(self.targets)}


def parse_targets(text):
    """'c_attn, mlp.c_proj' -> ('c_attn', 'mlp.c_proj'); duplicates dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Shapes: x (..., in) -> (..., out)."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight = base.weight  # (out, in): the same Parameter, so its name stays canonical
        self.bias = base.bias  # (out,) or None; apply_lora has frozen both
        self.scale = alpha / rank
        out_features, in_features = self.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=self.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=self.weight.device))  # (out, r): zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + update * self.scale


def find_targets(model, targets):
    """Names of the Linear layers the targets select; UserError for a target that selects nothing."""
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates} | {n.split(".")[-1] for n in candidates})
    chosen = []
    for t in targets:
        if t == "lm_head" or t.endswith(("wte", "wpe", "lm_head")):
            raise UserError(f"--lora-targets: {t!r} is tied to the token embedding (or is an embedding) and "
                            f"cannot take an adapter; choose from {', '.join(suffixes)}")
        hits = [n for n in candidates if n == t or n.endswith("." + t)]
        if not hits:
            raise UserError(f"--lora-targets: {t!r} matches no Linear layer of the blocks; "
                            f"choose from {', '.join(suffixes)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in candidates if n in chosen]  # model order


def apply_lora(model, cfg):
    """Freeze every parameter, then replace each target Linear by a LoRALinear (in place; seed torch first)."""
    names = find_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg


def merged_state_dict(model):
    """The model's state dict, CPU tensors, with every adapter merged (W + scale * B A) and its keys dropped:
    a plain GPT of the same config loads it strictly."""
    deltas = {f"{name}.weight": (m.lora_B.float() @ m.lora_A.float()) * m.scale  # (out, in), in fp32
              for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {k: ((v.float() + deltas[k]).to(v.dtype) if k in deltas else v).cpu().clone()
            for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}


def describe_memory(model):
    """One line for the start of a run: gradients and optimizer state are kept for the trainable parameters only."""
    params = list(model.parameters())  # nn.Module.parameters() yields tied weights once
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return f"trainable parameters {trainable / 1e6:.2f}M of {total / 1e6:.2f}M ({100 * trainable / max(total, 1):.2f}%)"
