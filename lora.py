"""
LoRA (low-rank adapters) for our GPT: wrap chosen nn.Linear layers, train only the adapters, merge.

A wrapped layer computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T
with the base W (out, in) and b frozen, A (r, in) initialised like nn.Linear (Kaiming uniform)
and B (out, r) zero, so training starts from the base model exactly (Hu et al. 2021).

State-dict names stay canonical: a wrapped layer keeps its base `weight` / `bias` under the same
names (the very Parameter objects) and adds `lora_A` / `lora_B` beside them, e.g.
`transformer.h.0.attn.c_attn.weight` (frozen), `transformer.h.0.attn.c_attn.lora_A`. So
`merged_state_dict(model)` (W + scale * B A, adapters dropped) is an ordinary GPT state dict that
checkpoint.model_from_checkpoint and inference load with nothing special, and a training
checkpoint of the wrapped model (base + adapters) resumes exactly.

Targets (--lora-targets): names of Linear layers inside the blocks, matched on whole dotted
suffixes: `c_attn` (fused q, k, v), `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`; `c_proj` means both
projections and `c_fc` is the same as `mlp.c_fc`. `lm_head` cannot be a target: it is tied to the
token embedding, so adapting it would silently adapt the input embedding too.

Memory: training updates only the adapters, so the gradients and the AdamW state (two fp32
moments per trainable parameter) shrink by the fraction of trainable parameters; activation
memory does not shrink (backprop still runs through every layer). `python lora.py` measures it
for GPT-2 124M shapes on CPU (a table, last line JSON).

API:
    cfg = LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=("c_attn", "c_proj", "c_fc"))
    names = apply_lora(model, cfg)        # freezes the whole model, wraps the targets (in place)
    merged_state_dict(model)              # canonical names, W + scale * B A
    merge_lora(model)                     # in place: back to a plain GPT with merged weights
    save_adapter(path, model, cfg, base="gpt2")  /  adapter = load_adapter(path)
    apply_adapter(base_model, adapter)    # wrap a base model and load the adapter weights
    count_parameters(model) -> (trainable, total); training_state_bytes(model) -> dict
"""

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_path, run_cli

ADAPTER_FORMAT = "gpt2-instruct-lora"
ADAPTER_VERSION = 1
ADAPTER_NAME = "adapter.pt"
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every Linear of every block (QLoRA: all layers is best)
LORA_KEYS = ("lora_A", "lora_B")
ADAM_STATES_PER_PARAM = 2  # exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_lora_config(self)

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_dict(self):
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]))


def check_lora_config(cfg):
    """UserError (one line) for a rank, alpha, dropout or target list that cannot work."""
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise UserError(f"--lora-rank must be an integer >= 1, got {cfg.rank}")
    if not (isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise UserError(f"--lora-alpha must be > 0, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.targets:
        raise UserError("--lora-targets is empty; name at least one layer, e.g. c_attn")
    for t in cfg.targets:
        if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", t):
            raise UserError(f"--lora-targets: {t!r} is not a layer name (e.g. c_attn, attn.c_proj, mlp.c_fc)")


def parse_targets(text):
    """'c_attn, mlp.c_proj' -> ('c_attn', 'mlp.c_proj'); duplicates dropped, order kept."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return tuple(out)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Shapes: x (..., in) -> (..., out)."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in): the same Parameter, so its name stays canonical
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))  # (out, r): zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + update * self.scale

    def delta_weight(self):
        """scale * B A: (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged_linear(self):
        """A plain nn.Linear holding W + scale * B A (and the same bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


# ---------------------------------------------------------------------- wrapping

def linear_names(model):
    """Qualified names of the nn.Linear layers inside the transformer blocks (lm_head excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]


def _matches(name, target):
    return name == target or name.endswith("." + target)


def find_targets(model, targets):
    """Names of the Linear layers the targets select; UserError for a target that selects nothing."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters")
    candidates = linear_names(model)
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates} | {n.split(".")[-1] for n in candidates})
    chosen = []
    for t in targets:
        if t == "lm_head" or t.endswith(("wte", "wpe", "lm_head")):
            raise UserError(f"--lora-targets: {t!r} is tied to the token embedding (or is an embedding) and "
                            f"cannot take an adapter; choose from {', '.join(suffixes)}")
        hits = [n for n in candidates if _matches(n, t)]
        if not hits:
            raise UserError(f"--lora-targets: {t!r} matches no Linear layer of the blocks; "
                            f"choose from {', '.join(suffixes)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in candidates if n in chosen]  # model order


def apply_lora(model, cfg):
    """Freeze every parameter, then replace each target Linear by a LoRALinear (in place).

    Seed torch first for a reproducible A. Returns the wrapped layers' names.
    """
    check_lora_config(cfg)
    names = find_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return names


def lora_modules(model):
    """(name, LoRALinear) pairs, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model):
    return bool(lora_modules(model))


def lora_state_dict(model):
    """The adapter weights alone: {'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)} on CPU."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().clone()
        out[f"{name}.lora_B"] = m.lora_B.detach().cpu().clone()
    return out


def merged_state_dict(model):
    """The model's state dict with every adapter merged (W + scale * B A) and its keys dropped.

    Canonical GPT names (a plain GPT of the same config loads it strictly). CPU tensors.
    """
    deltas = {f"{name}.weight": m.delta_weight() for name, m in lora_modules(model)}
    out = {}
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in LORA_KEYS:
            continue
        value = value.detach()
        if key in deltas:
            value = (value.float() + deltas[key]).to(value.dtype)
        out[key] = value.cpu().clone()
    return out


@torch.no_grad()
def merge_lora(model):
    """Replace every LoRALinear by a plain nn.Linear with merged weights (in place); returns model.

    Parameters stay frozen; the result is an ordinary GPT (state dict with canonical names only).
    """
    for name, m in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        lin = m.merged_linear()
        lin.requires_grad_(False)
        setattr(model.get_submodule(parent_name), child, lin)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---------------------------------------------------------------------- adapter files

def save_adapter(path, model, cfg, base=None, step=None, metrics=None):
    """Write the adapter alone (atomically), loadable with torch.load(weights_only=True)."""
    blob = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION,
        **cfg.to_dict(),
        "base": None if base is None else str(base),  # what --init-from the base model came from
        "base_config": model.config.to_dict(),
        "step": None if step is None else int(step),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
        "adapter": lora_state_dict(model),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_adapter(path):
    """Read and check an adapter file -> dict (see save_adapter); UserError on anything wrong."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_NAME)
    if not os.path.isfile(path):
        raise UserError(f"adapter not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, pickled classes
        raise UserError(f"not a readable adapter file: {path} ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{path} is not a {ADAPTER_FORMAT} adapter file")
    if blob.get("format_version") != ADAPTER_VERSION:
        raise UserError(f"{path} has adapter format_version {blob.get('format_version')}; "
                        f"this code reads {ADAPTER_VERSION}")
    blob["lora_config"] = LoRAConfig.from_dict(blob)
    return blob


def apply_adapter(model, adapter):
    """Wrap a base GPT with the adapter's LoRA layers and load its weights (in place); returns names."""
    from model import GPTConfig

    base = adapter.get("base_config")
    if base is not None:
        want, have = GPTConfig.from_dict(base).to_dict(), model.config.to_dict()
        diff = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size") if want[k] != have[k]]
        if diff:
            raise UserError("the adapter was trained on a different model shape (" +
                            ", ".join(f"{k} {want[k]} vs {have[k]}" for k in diff) + ")")
    names = apply_lora(model, adapter["lora_config"])
    weights = adapter["adapter"]
    expected = {f"{n}.{k}" for n in names for k in LORA_KEYS}
    if set(weights) != expected:
        raise UserError(f"the adapter's weights do not match its targets "
                        f"({len(weights)} tensors, expected {len(expected)})")
    with torch.no_grad():
        for name, m in lora_modules(model):
            for k in LORA_KEYS:
                src, dst = weights[f"{name}.{k}"], getattr(m, k)
                if src.shape != dst.shape:
                    raise UserError(f"adapter tensor {name}.{k} has shape {tuple(src.shape)}, "
                                    f"expected {tuple(dst.shape)}")
                dst.copy_(src)
    return names


# ---------------------------------------------------------------------- sizes and memory

def count_parameters(model):
    """(trainable, total) parameter counts, tied weights once."""
    params = list(model.parameters())  # nn.Module.parameters() yields shared tensors once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def training_state_bytes(model, full=False):
    """Bytes of gradients and AdamW moments that training this model keeps (from its trainable params).

    full=True: as if every parameter but the adapters were trained (full fine-tuning of the same model).
    {"trainable", "total", "grad_bytes", "optimizer_bytes", "bytes"}: grads have the params' dtype,
    AdamW keeps exp_avg and exp_avg_sq in fp32 (plus a scalar step per tensor).
    """
    trainable, total = count_parameters(model)
    if full:
        adapters = {id(m.lora_A) for _, m in lora_modules(model)} | {id(m.lora_B) for _, m in lora_modules(model)}
        params = [p for p in model.parameters() if id(p) not in adapters]
        trainable = sum(p.numel() for p in params)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    grad = sum(p.numel() * p.element_size() for p in params)
    opt = sum(ADAM_STATES_PER_PARAM * p.numel() * 4 + 4 for p in params)
    return {"trainable": trainable, "total": total, "grad_bytes": grad, "optimizer_bytes": opt, "bytes": grad + opt}


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


def describe_memory(model):
    """One line for the start of a run: trainable parameters and the gradient + AdamW memory (vs full)."""
    s, full = training_state_bytes(model), training_state_bytes(model, full=True)["bytes"]
    line = (f"trainable parameters {s['trainable'] / 1e6:.2f}M of {s['total'] / 1e6:.2f}M "
            f"({100 * s['trainable'] / max(s['total'], 1):.2f}%); gradients + AdamW state {_mb(s['bytes'])}")
    if full > s["bytes"]:
        line += (f" instead of {_mb(full)} for full fine-tuning: LoRA saves {_mb(full - s['bytes'])} "
                 f"(activations are not reduced)")
    return line


def _mb(n):
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


# ---------------------------------------------------------------------- CLI: memory report

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
    from model import GPT, GPTConfig

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
        print(f"{name:<6}{r['trainable']:>14,}{_mb(m['grad_bytes']):>12}{_mb(m['optimizer_bytes']):>14}"
              f"{_mb(m['bytes']):>12}")
    saved = rows["full"]["measured"]["bytes"] - rows["lora"]["measured"]["bytes"]
    print(f"LoRA rank {cfg.rank} on {', '.join(cfg.targets)} saves {_mb(saved)} of gradients + optimizer state "
          f"({100 * saved / rows['full']['measured']['bytes']:.1f}%); activations are not reduced")
    result = {"config": config.to_dict(), "lora": cfg.to_dict(), "saved_bytes": saved,
              **{k: {"trainable": r["trainable"], "total": r["total"], **r["measured"]} for k, r in rows.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
