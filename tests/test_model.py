from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from checkpoint import load_model
from model import GPT, GPTConfig, KVCache, pack_host
from optim import Optimizer

transformers = pytest.importorskip("transformers")


def hf_model(cfg: GPTConfig, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms to constants: randomise them to test mapping
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("shape", [
    dict(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64),
    dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),  # the real 124M shapes
], ids=["tiny", "124M"])
def test_logits_match_transformers_both_ways(tmp_path, shape):
    cfg = GPTConfig(**shape)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    assert ours.config.vocab_size == cfg.vocab_size and ours.config.n_layer == cfg.n_layer

    idx = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        expected = ref(idx).logits
        got, _ = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4


def test_param_count_124M():
    model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params() == 124_439_808
    assert model.num_params(exclude_positions=True) == 124_439_808 - 1024 * 768


def test_weights_tied_and_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_embd=256, n_head=4, block_size=64, vocab_size=512))
    assert model.lm_head.weight is model.transformer.wte.weight
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (24 ** 0.5)) < 0.0005


def test_kv_cache_greedy_equals_full_recompute(tiny_model):
    torch.manual_seed(1)
    prompt = torch.randint(0, 50257, (1, 7))
    n_new = 64
    # without cache: recompute the whole sequence each step
    seq = prompt.clone()
    ref_logits = []
    with torch.no_grad():
        for _ in range(n_new):
            logits, _ = tiny_model(seq)
            ref_logits.append(logits[:, -1])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        # with cache: prefill, then one token per step at the row's own position
        cache = KVCache(tiny_model.config, 1)
        k_ptr = cache.k[0].data_ptr()
        logits, _ = tiny_model(prompt, cache=cache, pos=torch.tensor([0]), kv_len=7)
        out = prompt.clone()
        for i in range(n_new):
            step_logits = logits[:, -1]
            assert (step_logits - ref_logits[i]).abs().max().item() <= 1e-4
            nxt = step_logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            logits, _ = tiny_model(nxt, cache=cache, pos=torch.tensor([7 + i]), kv_len=128)
    assert torch.equal(out, seq)
    assert cache.k[0].data_ptr() == k_ptr  # preallocated: never re-allocated


def test_slots_decode_at_their_own_positions(tiny_model):
    """Rows of different lengths, each in its slot at its own position (no shared padding), chunked
    prefill into chosen slots, one batched decode step: each row equals itself computed alone."""
    torch.manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,)) for n in (5, 9, 3)]
    cache = KVCache(tiny_model.config, 4)
    with torch.no_grad():
        cache.k[0][2].fill_(1e3)  # stale values from an earlier sequence must not matter
        for slot, p in zip((2, 0, 1), prompts):  # prefill in chunks of 4 tokens
            for s in range(0, len(p), 4):
                chunk = p[s:s + 4][None]
                tiny_model(chunk, cache=cache, pos=torch.tensor([s]), slots=torch.tensor([slot]),
                           kv_len=s + chunk.size(1))
        nxt = torch.randint(0, 50257, (4, 1))
        pos = torch.tensor([9, 3, 5, 0])  # slot 3 is idle: its output is ignored
        logits, _ = tiny_model(nxt, cache=cache, pos=pos, kv_len=16)
        for slot, p in zip((2, 0, 1), prompts):
            ref, _ = tiny_model(torch.cat([p, nxt[slot]])[None])
            assert (ref[0, -1] - logits[slot, 0]).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_one_shot(tiny_model):
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        full, _ = tiny_model(idx)
        cache = KVCache(tiny_model.config, 2)
        a, _ = tiny_model(idx[:, :12], cache=cache, pos=torch.tensor([0, 0]), kv_len=12)
        b, _ = tiny_model(idx[:, 12:], cache=cache, pos=torch.tensor([12, 12]), kv_len=20)
    assert (torch.cat([a, b], 1) - full).abs().max().item() <= 1e-4


def test_positions_past_block_size_raise(tiny_model):
    cfg = tiny_model.config
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_loss_ignores_minus_one_and_sum_reduction(tiny_model):
    idx = torch.randint(0, 50257, (2, 10))
    targets = torch.randint(0, 50257, (2, 10))
    targets[:, :4] = -1
    _, mean = tiny_model(idx, targets)
    _, total = tiny_model(idx, targets, reduction="sum")
    assert torch.allclose(mean * 12, total, rtol=1e-5)


def test_adamw_decays_matrices_and_embeddings_only(tiny_model):
    args = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.1)
    decay, no_decay = Optimizer(tiny_model, args, "cpu").adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == tiny_model.num_params()


def test_flops_per_token():
    model = GPT(tiny_config())
    cfg = model.config
    n = model.num_params(exclude_positions=True)
    assert model.flops_per_token(128) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * 128


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)




def test_pack_pads_to_a_graphs_shapes():
    """Prompt chunks (ids, slot, start) packed for a CUDA graph of 8 tokens and 4 rows: each token's position
    and flat cache index (slot * block_size + position); padding tokens write to the spare slot (5), padding
    rows have no tokens and no keys."""
    longs, ints, max_q, rows = pack_host([([5, 6, 7], 2, 0), ([8, 9], 0, 10), ([1], 3, 4)], 16, (8, 4, 128, 5))
    assert longs.tolist() == [[5, 6, 7, 8, 9, 1, 0, 0], [0, 1, 2, 10, 11, 4, 0, 0], [32, 33, 34, 10, 11, 52, 80, 80]]
    cu_q, key_start, used = ints[:5].tolist(), ints[5:10].tolist(), ints[10:].tolist()
    assert cu_q == [0, 3, 5, 6, 6] and key_start[:4] == [32, 0, 48, 0] and used == [3, 12, 5, 0]
    assert max_q == 128 and rows == [(2, 0, 3), (0, 10, 2), (3, 4, 1)]
