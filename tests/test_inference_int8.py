"""int8 (dynamic, per-channel) quantization keeps a briefly trained tiny model close to fp32 on real text."""

import copy
import json
import lzma
import os

import pytest
import torch
from conftest import ROOT, tiny_config

import inference as inf
from checkpoint import save_checkpoint
from model import GPT
from tokenizer import N_VOCAB, encode

CORPUS = os.path.join(ROOT, "demo_data", "books.jsonl.xz")  # public-domain novels bundled for the demo
T = 32


def book_tokens(n_chars=60_000):
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        return torch.tensor(encode(json.loads(f.readline())["text"][:n_chars]))


@pytest.fixture(scope="module")
def trained():
    """(fp32 model, held-out (x, y)): 12 AdamW steps on a public-domain book (val loss 10.8 -> about 7.8)."""
    torch.manual_seed(0)
    ids = book_tokens()
    split = int(len(ids) * 0.9)
    train, val = ids[:split], ids[split:]
    model = GPT(tiny_config(block_size=T, n_layer=2, n_head=4, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        ix = torch.randint(0, len(train) - T - 1, (8,), generator=g)
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = (len(val) - 1) // T * T
    x, y = val[:n].view(-1, T)[:48], val[1:n + 1].view(-1, T)[:48]
    return model.eval().requires_grad_(False), (x, y)


def test_int8_logits_and_perplexity_close_to_fp32(trained):
    model, (x, y) = trained
    q = inf.quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        ref, ref_loss = model(x, y)
        got, q_loss = q(x, y)
    assert ref_loss.item() < 8.3, "the model must have learned something for the comparison to mean anything"
    assert abs(q_loss.item() - ref_loss.item()) < 0.02  # perplexity within 2%
    ref, got = ref[..., :N_VOCAB], got[..., :N_VOCAB]
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert cos.min().item() > 0.99
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() > 0.9
    quantized = [m for m in q.modules() if "quantized.dynamic" in type(m).__module__ and type(m).__name__ == "Linear"]
    assert len(quantized) == 2 * 4 + 1  # every Linear of the blocks, and lm_head
    assert not any(type(m) is torch.nn.Linear for m in q.modules())


def test_int8_checkpoint_generates(tmp_path, trained):
    model, _ = trained
    path = save_checkpoint(tmp_path / "ckpt.pt", kind="pretrain", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=12)
    q, info = inf.load_model_from_checkpoint(path, device="cpu", quantize="int8")
    assert info["quantize"] == "int8" and info["dtype"] == "float32" and info["n_params"] == model.num_params()
    r = inf.generate_text(q, "It was", max_new_tokens=12, temperature=0, raw=True, ignore_eos=True)
    ref = inf.generate_text(model, "It was", max_new_tokens=12, temperature=0, raw=True, ignore_eos=True)
    assert r["completion_tokens"] == 12 and r["token_ids"][:3] == ref["token_ids"][:3]
