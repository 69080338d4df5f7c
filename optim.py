"""The optimizer of both training scripts: AdamW alone, or Muon for the blocks' matrices + AdamW for the rest.

--optimizer muon: torch.optim.Muon (momentum 0.95, Nesterov; its update is the momentum orthogonalised
by Newton-Schulz, its LR scaled by sqrt(max(1, rows / cols))) takes every trainable 2-D weight of the
transformer blocks; AdamW takes the embeddings (the tied head too), norms and biases. LoRA adapters
always train with AdamW: they are rank-r factors whose product, not each factor, is the update Muon
would want to orthogonalise, and their LRs were tuned for AdamW. Each group keeps its peak LR as
"peak_lr"; the schedule scales every group's LR by the same factor.
"""

import inspect

import torch

from lora import LORA_KEYS

MUON_MOMENTUM = 0.95  # Keller Jordan's and torch's default; Nesterov on


class Optimizer:
    """AdamW, plus Muon when it has matrices to train: stepped, zeroed and checkpointed as one."""

    def __init__(self, model, args, device_type):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrix = [p for n, p in params if args.optimizer == "muon" and p.dim() == 2
                  and n.startswith("transformer.h.") and n.rsplit(".", 1)[-1] not in LORA_KEYS]
        rest = [p for _, p in params if all(p is not m for m in matrix)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        self.adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                       **({"fused": True} if fused else {}))
        self.muon = torch.optim.Muon(matrix, lr=args.muon_lr, weight_decay=args.muon_weight_decay,
                                     momentum=MUON_MOMENTUM, nesterov=True) if matrix else None
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["peak_lr"] = group["lr"]

    @property
    def optimizers(self):
        return [self.adamw] + ([self.muon] if self.muon else [])

    def describe(self):
        if self.muon is None:
            return "AdamW"
        n = sum(p.numel() for g in self.muon.param_groups for p in g["params"])
        return f"Muon on {n / 1e6:.2f}M matrix parameters, AdamW on the rest"

    def step(self, lr_factor):
        """Set every group's LR to its peak x lr_factor (the schedule), then step."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor
            opt.step()

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self):
        """AdamW's state dict (the format of AdamW-only checkpoints); with Muon, both under their names."""
        if self.muon is None:
            return self.adamw.state_dict()
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        if ("muon" in state) != (self.muon is not None):
            raise ValueError(f"it was saved {'with' if 'muon' in state else 'without'} Muon; pass the run's --optimizer")
        if self.muon is None:
            return self.adamw.load_state_dict(state)
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
