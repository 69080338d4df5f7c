"""lora.py: frozen base, adapter-only gradients, exact merge, target selection; the optimizer of adapters."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from common import UserError
from lora import LoRAConfig, LoRALinear, apply_lora, describe_memory, find_targets, merged_state_dict, parse_targets
from model import GPT
from optim import Optimizer

CFG = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


def base_model(seed=0):
    torch.manual_seed(seed)
    return GPT(tiny_config(**CFG))


def lora_model(cfg, seed=0, randomize_b=True):
    """A tiny GPT with adapters; B randomised (it starts at zero) so the adapters change the output."""
    model = base_model(seed)
    torch.manual_seed(seed + 1)
    apply_lora(model, cfg)
    if randomize_b:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_(0, 0.05)
    return model


def tokens(seed=3, shape=(2, 12)):
    return torch.randint(0, CFG["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def test_only_adapter_parameters_get_gradients():
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("c_attn", "c_proj", "c_fc"))
    model = lora_model(cfg).train()
    x = tokens()
    _, loss = model(x, x)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
    assert len(with_grad) == 2 * 4 * CFG["n_layer"]  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    C = CFG["n_embd"]
    per_block = 4 * (C + 3 * C) + 4 * (C + C) + 4 * (C + 4 * C) + 4 * (4 * C + C)  # r * (in + out) per layer
    trainable_n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable_n == CFG["n_layer"] * per_block and total == base_model().num_params() + trainable_n
    assert describe_memory(model).startswith(f"trainable parameters {trainable_n / 1e6:.2f}M of {total / 1e6:.2f}M")
    opt = Optimizer(model, SimpleNamespace(optimizer="adamw", lr=1e-2, weight_decay=0.1), "cpu")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt.step(1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_fresh_adapters_leave_the_model_unchanged_and_names_stay_canonical():
    base = base_model().eval()
    model = lora_model(LoRAConfig(rank=2, alpha=4, dropout=0.0), randomize_b=False).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[0], base(x)[0])  # B = 0: exactly the base model
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names  # base weights keep their names
    assert {n for n in names - set(base.state_dict())} == {
        f"{layer}.{k}" for layer, m in model.named_modules() if isinstance(m, LoRALinear) for k in ("lora_A", "lora_B")}


def test_merged_logits_equal_base_plus_adapters():
    cfg = LoRAConfig(rank=3, alpha=6, dropout=0.2, targets=("c_attn", "mlp.c_proj"))
    model = lora_model(cfg).eval()
    x = tokens()
    with torch.no_grad():
        logits = model(x)[0]
        # one layer by hand: y = x W^T + b + (alpha / r) x A^T B^T
        layer = model.transformer.h[0].attn.c_attn
        h = torch.randn(5, CFG["n_embd"])
        manual = h @ layer.weight.T + layer.bias + (alpha_over_r := 6 / 3) * (h @ layer.lora_A.T @ layer.lora_B.T)
        assert alpha_over_r == layer.scale
        assert torch.allclose(layer(h), manual, atol=1e-6)

    plain = GPT(tiny_config(**CFG)).eval()
    plain.load_state_dict(merged_state_dict(model))  # strict: canonical names only
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], logits, atol=1e-5)
        assert not torch.allclose(plain(x)[0], base_model().eval()(x)[0], atol=1e-3)  # the adapters matter


def test_target_selection_and_bad_settings():
    model = base_model()
    assert find_targets(model, ("c_attn",)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    both = find_targets(model, ("c_proj",))
    assert both == [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    assert find_targets(model, ("attn.c_proj",)) == [n for n in both if ".attn." in n]
    assert find_targets(model, ("mlp.c_fc",)) == find_targets(model, ("c_fc",))
    assert parse_targets(" c_attn, mlp.c_proj ,c_attn,") == ("c_attn", "mlp.c_proj")
    for bad, msg in ((("q_proj",), "matches no Linear"), (("lm_head",), "tied to the token embedding"),
                     (("transformer.wte",), "tied to the token embedding"), (("c attn",), "matches no Linear"),
                     ((), "is empty")):
        with pytest.raises(UserError, match=msg) as err:
            apply_lora(base_model(), LoRAConfig(rank=2, alpha=2, dropout=0.0, targets=bad)) if bad != () \
                else LoRAConfig(targets=bad)
        assert "\n" not in str(err.value)
    wrapped = lora_model(LoRAConfig(rank=2, alpha=2, dropout=0.0))
    assert isinstance(wrapped.transformer.h[0].mlp.c_fc, LoRALinear)


def test_muon_takes_the_block_matrices_or_the_adapters():
    """--optimizer muon: full fine-tuning gives Muon the blocks' matrices; with LoRA it takes every adapter and no
    AdamW is made. A state saved for one set of optimizers does not load into another."""
    args = SimpleNamespace(optimizer="muon", lr=1e-3, weight_decay=0.0, muon_lr=0.02, muon_weight_decay=0.0)
    full = Optimizer(base_model(), args, "cpu")
    assert len(full.muon.param_groups[0]["params"]) == 4 * CFG["n_layer"] and full.adamw is not None
    model = lora_model(LoRAConfig(rank=2, alpha=4, dropout=0.0))
    opt = Optimizer(model, args, "cpu")
    assert opt.adamw is None and opt.describe().startswith("Muon (lr 0.02) on") and list(opt.state_dict()) == ["muon"]
    assert len(opt.muon.param_groups[0]["params"]) == 2 * 4 * CFG["n_layer"]
    x = tokens()
    model(x, x)[1].backward()
    opt.step(1.0)
    opt.load_state_dict(opt.state_dict())
    for other in (full, Optimizer(model, SimpleNamespace(**{**vars(args), "optimizer": "adamw"}), "cpu")):
        with pytest.raises(ValueError, match="pass the run's --optimizer"):
            opt.load_state_dict(other.state_dict())
