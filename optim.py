"""The optimizer of both training scripts: AdamW alone, or torch.optim.Muon for the blocks' trainable 2-D
weights (under LoRA: the adapters, and no AdamW) + AdamW for the rest (docs/design.md, Command lines)."""

import torch

MUON_MOMENTUM = 0.95  # Keller Jordan's and torch's default; Nesterov on


class Optimizer:
    """AdamW and / or Muon, whichever has parameters to train: stepped, zeroed and checkpointed as one."""

    def __init__(self, model, args, device_type):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrix = [p for n, p in params if args.optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
        rest = [p for _, p in params if all(p is not m for m in matrix)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                       fused=device_type == "cuda") if rest else None
        self.muon = torch.optim.Muon(matrix, lr=args.muon_lr, weight_decay=args.muon_weight_decay,
                                     momentum=MUON_MOMENTUM, nesterov=True) if matrix else None
        self.named = {name: opt for name, opt in (("adamw", self.adamw), ("muon", self.muon)) if opt is not None}
        for opt in self.named.values():
            for group in opt.param_groups:
                group["peak_lr"] = group["lr"]

    def describe(self):
        adamw = self.adamw and f"AdamW (lr {self.adamw.param_groups[0]['peak_lr']:g})"
        if self.muon is None:
            return adamw
        n = sum(p.numel() for g in self.muon.param_groups for p in g["params"])
        muon = f"Muon (lr {self.muon.param_groups[0]['peak_lr']:g}) on {n / 1e6:.2f}M matrix parameters"
        return muon + (f", {adamw} on the rest" if adamw else "")

    def step(self, lr_factor):
        """Set every group's LR to its peak x lr_factor (the schedule), then step."""
        for opt in self.named.values():
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor
            opt.step()

    def zero_grad(self):
        for opt in self.named.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self):
        """AdamW's state dict (the format of AdamW-only checkpoints); with Muon, each under its name."""
        if self.muon is None:
            return self.adamw.state_dict()
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state):
        saved = sorted(state) if "muon" in state else ["adamw"]
        if saved != sorted(self.named):
            raise ValueError(f"it was saved for {' + '.join(saved)}, this run trains with {' + '.join(self.named)}; "
                             f"pass the run's --optimizer")
        if self.muon is None:
            return self.adamw.load_state_dict(state)
        for name, opt in self.named.items():
            opt.load_state_dict(state[name])
