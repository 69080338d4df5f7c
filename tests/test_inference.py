"""inference.py on a tiny random GPT (CPU): decoding correctness, sampling, seeds, batching, params, loading, CLI."""

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config

import inference as inf
from checkpoint import save_checkpoint
from common import UserError, run_cli
from model import GPT
from tokenizer import EOT_ID, N_VOCAB, decode

PROMPTS = ["a", "Hello there my friend, how are", "x y", "one two three four five six seven eight"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = GPT(tiny_config()).eval().requires_grad_(False)
    inf.configure_engine(m)  # fresh engine per test
    return m


def greedy_by_recompute(model, ids, n):
    """Reference: no cache, the whole sequence through the model every step."""
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            nxt = logits[0, -1, :N_VOCAB].argmax().item()
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


# ---------------------------------------------------------------- decoding correctness


def test_kv_cache_generation_equals_full_recompute(model):
    prompt = "Hello there my friend"
    r = inf.generate_text(model, prompt, max_new_tokens=40, temperature=0, raw=True, ignore_eos=True)
    assert r["token_ids"] == greedy_by_recompute(model, inf.encode_prompt(prompt, raw=True), 40)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 40


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_static_mode_matches_eager_with_bucket_crossing(model, mode):
    """The graph path without graphs (static cache, 16-slot buckets, chunks of 4) against recompute."""
    inf.configure_engine(model, mode=mode, chunk=4, bucket=16)
    prompt = "one two three"
    r = inf.generate_text(model, prompt, max_new_tokens=40, temperature=0, raw=True, ignore_eos=True)
    assert r["token_ids"] == greedy_by_recompute(model, inf.encode_prompt(prompt, raw=True), 40)


def test_top_k_1_equals_greedy(model):
    greedy = inf.generate_text(model, "The cat", max_new_tokens=30, temperature=0, raw=True)
    top1 = inf.generate_text(model, "The cat", max_new_tokens=30, temperature=1.3, top_k=1, seed=5, raw=True)
    assert top1["token_ids"] == greedy["token_ids"]


def test_sampling_never_returns_padding_ids(model):
    with torch.no_grad():  # make the padded vocab rows (>= 50257) by far the most likely
        model.lm_head.weight[N_VOCAB:] = model.lm_head.weight[:N_VOCAB].abs().max() * 50
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=0, seed=1), dict(temperature=1.0, top_k=50, seed=1)):
        r = inf.generate_text(model, "x", max_new_tokens=10, raw=True, ignore_eos=True, **kw)
        assert max(r["token_ids"]) < N_VOCAB


def sample(logits, u, top_k, top_p, n_cand, temperature=1.0):
    B, V = logits.size(0), min(logits.size(1), N_VOCAB)
    return inf.sample_tokens(logits, seen=torch.zeros(B, V, dtype=torch.bool),
                             greedy=torch.zeros(B, 1, dtype=torch.bool), penalty=torch.ones(B, 1), u=u,
                             temperature=torch.full((B, 1), temperature), top_k=torch.full((B, 1), top_k),
                             top_p=torch.full((B, 1), top_p), n_cand=n_cand)


def test_sample_tokens_follows_filtered_distribution():
    """Inverse-CDF sampling with top-k / top-p / temperature gives the expected frequencies."""
    torch.manual_seed(0)
    logits = torch.full((1, 1000), -30.0)  # a 1000-token vocabulary keeps 4000 rows cheap
    logits[0, [10, 20, 30, 40]] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    u = torch.rand(n, 1)

    def freqs(top_k, top_p, temperature=1.0, n_cand=inf.TOPK_CANDIDATES):
        ids = sample(logits.expand(n, -1), u, top_k, top_p, n_cand, temperature)
        return [(ids == t).float().mean().item() for t in (10, 20, 30, 40)]

    def close(got, want):
        return all(abs(g - w) < 0.025 for g, w in zip(got, want))

    assert close(freqs(top_k=1000, top_p=2.0, n_cand=-1), [0.5, 0.3, 0.15, 0.05])  # no filter, no sort
    assert close(freqs(top_k=2, top_p=2.0), [0.625, 0.375, 0, 0])  # renormalised over the top 2
    assert close(freqs(top_k=256, top_p=0.7), [0.625, 0.375, 0, 0])  # 0.5 + 0.3 reaches 0.7
    assert close(freqs(top_k=256, top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert close(freqs(top_k=256, top_p=2.0, temperature=0.5), (p2 / p2.sum()).tolist())  # p^(1/T)


def test_sampling_paths_pick_the_same_ids():
    """topk, full sort and no-sort paths choose the same id for the same u: batch composition
    (which decides the path) never changes a seeded row's text."""
    torch.manual_seed(1)
    logits = torch.randn(24, N_VOCAB) * 3
    u = torch.rand(24, 1)
    a = sample(logits, u, top_k=40, top_p=0.9, n_cand=inf.TOPK_CANDIDATES)
    b = sample(logits, u, top_k=40, top_p=0.9, n_cand=N_VOCAB)
    assert torch.equal(a, b)
    c = sample(logits, u, top_k=N_VOCAB, top_p=2.0, n_cand=-1)
    d = sample(logits, u, top_k=N_VOCAB, top_p=2.0, n_cand=N_VOCAB)
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_repetition_penalty_is_ctrl_style():
    logits = torch.zeros(1, N_VOCAB)
    logits[0, 1], logits[0, 2], logits[0, 3] = 2.0, 1.5, -1.0
    seen = torch.zeros(1, N_VOCAB, dtype=torch.bool)
    seen[0, 1] = True
    args = dict(temperature=torch.ones(1, 1), greedy=torch.ones(1, 1, dtype=torch.bool), top_k=torch.ones(1, 1),
                top_p=torch.full((1, 1), 2.0), u=torch.zeros(1, 1), n_cand=0)
    assert inf.sample_tokens(logits, seen=seen, penalty=torch.ones(1, 1), **args).item() == 1
    assert inf.sample_tokens(logits, seen=seen, penalty=torch.full((1, 1), 1.5), **args).item() == 2  # 2.0/1.5 < 1.5
    assert inf.sample_tokens(logits, seen=None, penalty=torch.full((1, 1), 1.5), **args).item() == 1  # off


def test_sampler_kind():
    p = inf.validate_params
    assert inf.sampler_kind([p(temperature=0), p(temperature=0)]) == (0, False)
    assert inf.sampler_kind([p(temperature=0), p(temperature=0.5, top_k=0)]) == (-1, False)
    assert inf.sampler_kind([p(temperature=0.5, top_k=40, top_p=0.9), p(temperature=0.5, top_k=0)]) == (N_VOCAB, False)
    assert inf.sampler_kind([p(temperature=0.5), p(temperature=0, repetition_penalty=1.2)]) == (256, True)


def test_repetition_penalty_reduces_repeats(model):
    plain = inf.generate_text(model, "a", max_new_tokens=40, temperature=0, raw=True)
    pen = inf.generate_text(model, "a", max_new_tokens=40, temperature=0, repetition_penalty=2.0, raw=True)
    assert len(set(pen["token_ids"])) > len(set(plain["token_ids"]))


# ---------------------------------------------------------------- seeds and RNG


def rng_snapshot():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def test_same_seed_same_text_and_global_rng_untouched(model):
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    before = rng_snapshot()
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=0, raw=True, ignore_eos=True)
    a = inf.generate_text(model, "Once upon", seed=42, **kw)
    b = inf.generate_text(model, "Once upon", seed=42, **kw)
    c = inf.generate_text(model, "Once upon", seed=43, **kw)
    inf.generate_text(model, "Once upon", seed=None, **kw)
    list(inf.stream_text(model, "Once upon", seed=None, **kw))
    after = rng_snapshot()
    assert a["text"] == b["text"] and a["token_ids"] == b["token_ids"]
    assert c["token_ids"] != a["token_ids"]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_seed_reproducible_in_batch_and_static_mode(model):
    kw = dict(max_new_tokens=25, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=7, raw=True)
    alone = [inf.generate_text(model, p, **kw)["token_ids"] for p in PROMPTS]
    batch = [r["token_ids"] for r in inf.generate_batch(model, PROMPTS, **kw)]
    inf.configure_engine(model, mode="static", chunk=3, bucket=16, pipeline=True)
    static = [r["token_ids"] for r in inf.generate_batch(model, PROMPTS, **kw)]
    assert batch == alone and static == alone


# ---------------------------------------------------------------- batching


ENGINES = pytest.mark.parametrize("engine", [dict(mode="eager"), dict(mode="static", chunk=4, bucket=16),
                                             dict(mode="static", chunk=3, bucket=16, pipeline=True)],
                                    ids=["eager", "static", "static-pipelined"])


@ENGINES
def test_batch_equals_single_greedy(model, engine):
    inf.configure_engine(model, **engine)
    single = [inf.generate_text(model, p, max_new_tokens=20, temperature=0, raw=True) for p in PROMPTS]
    batch = inf.generate_batch(model, PROMPTS, max_new_tokens=20, temperature=0, raw=True)
    for s, b in zip(single, batch):
        assert b["token_ids"] == s["token_ids"] and b["text"] == s["text"]
        assert b["prompt_tokens"] == s["prompt_tokens"] and b["finish_reason"] == s["finish_reason"]


@ENGINES
def test_batch_per_row_params_and_early_finish(model, engine):
    """Rows end at different steps (the batch shrinks); each still equals its own single run."""
    inf.configure_engine(model, **engine)
    max_new = [18, 3, 11, 6]
    temps = [0, 0.8, 0, 1.1]
    penalties = [1.0, 1.0, 1.5, 1.0]  # alone, rows 0, 1 and 3 skip the penalty ops; together they run
    batch = inf.generate_batch(model, PROMPTS, max_new_tokens=max_new, temperature=temps, seed=3, raw=True,
                               repetition_penalty=penalties)
    for p, n, t, pen, b in zip(PROMPTS, max_new, temps, penalties, batch):
        s = inf.generate_text(model, p, max_new_tokens=n, temperature=t, seed=3, raw=True, repetition_penalty=pen)
        assert b["token_ids"] == s["token_ids"] and b["completion_tokens"] == n


def test_batch_split_when_width_plus_new_exceeds_block(model):
    """A long prompt and a long generation cannot share one cache: the engine runs them apart."""
    long_prompt = " ".join(["word"] * 90)  # 90 tokens; block_size 128
    prompts, max_new = [long_prompt, "hi"], [8, 60]
    batch = inf.generate_batch(model, prompts, max_new_tokens=max_new, temperature=0, raw=True)
    for prompt, n, b in zip(prompts, max_new, batch):
        assert b["token_ids"] == inf.generate_text(model, prompt, max_new_tokens=n, temperature=0,
                                                   raw=True)["token_ids"]


class LastOnlyGPT(GPT):
    """GPT whose forward takes last_only (the proposed model.py change): logits of the last position."""

    seen = []

    def forward(self, idx, targets=None, kv_cache=None, input_pos=None, reduction="mean", last_only=False):
        LastOnlyGPT.seen.append((idx.size(1), last_only))
        logits, loss = super().forward(idx, targets, kv_cache, input_pos, reduction)
        return (logits[:, -1:] if last_only else logits), loss


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_prefill_asks_for_last_position_only_when_supported(model, mode):
    fast = LastOnlyGPT(model.config).eval().requires_grad_(False)
    fast.load_state_dict(model.state_dict())
    inf.configure_engine(fast, mode=mode, bucket=16)
    LastOnlyGPT.seen.clear()
    kw = dict(max_new_tokens=8, temperature=0, raw=True)
    got = inf.generate_batch(fast, PROMPTS[:2], **kw)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in inf.generate_batch(model, PROMPTS[:2], **kw)]
    width = max(inf.count_tokens(p, raw=True) for p in PROMPTS[:2])
    assert (width, True) in LastOnlyGPT.seen and all(not last for t, last in LastOnlyGPT.seen if t == 1)


def test_engine_follows_the_model_to_another_dtype(model):
    inf.configure_engine(model, mode="static", chunk=2, bucket=16)
    model.to(torch.float64)
    r = inf.generate_text(model, "x", max_new_tokens=3, temperature=0, raw=True)
    engine = inf.get_engine(model)
    assert r["completion_tokens"] == 3 and engine.dtype == torch.float64 and engine.mode == "static"


def test_engine_does_not_keep_its_model_alive():
    import gc
    import weakref

    m = GPT(tiny_config(n_layer=1)).eval()
    inf.generate_text(m, "x", max_new_tokens=2, temperature=0, raw=True)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_stream_batch_events(model):
    events = list(inf.stream_batch(model, ["a", "b c"], max_new_tokens=5, temperature=0, raw=True))
    done = [e for e in events if e.get("done")]
    assert sorted(e["index"] for e in done) == [0, 1]
    for i in (0, 1):
        text = "".join(e["text"] for e in events if e["index"] == i and not e.get("done"))
        assert text == next(e for e in done if e["index"] == i)["text"]


# ---------------------------------------------------------------- results, limits, cancellation


def test_finish_reasons_and_usage(model):
    r = inf.generate_text(model, "Hello", max_new_tokens=7, temperature=0, raw=True)
    assert r["finish_reason"] in ("length", "eos")
    assert r["prompt_tokens"] == 1 and r["completion_tokens"] == len(r["token_ids"]) <= 7
    assert r["text"] == decode([t for t in r["token_ids"] if t != EOT_ID])
    assert set(r["timings"]) >= {"prefill_ms", "decode_ms", "total_ms"}
    # the template counts: prompt_tokens is what the model read
    t = inf.generate_text(model, "Hello", max_new_tokens=1, temperature=0)
    assert t["prompt_tokens"] == inf.count_tokens("Hello") > 20


def test_eos_ends_generation(model):
    with torch.no_grad():  # every final hidden state = ones, and only <|endoftext|> points along it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[EOT_ID] = 1.0  # logit 64 against about N(0, 0.16) for the rest
    r = inf.generate_text(model, "Hi", max_new_tokens=20, temperature=0, raw=True)
    assert r["finish_reason"] == "eos" and r["completion_tokens"] == 1 and r["text"] == ""
    assert r["token_ids"] == [EOT_ID]
    r = inf.generate_text(model, "Hi", max_new_tokens=3, temperature=0, raw=True, ignore_eos=True)
    assert r["finish_reason"] == "length" and r["text"] == "<|endoftext|>" * 3


def test_block_size_overflow_is_a_clear_error(model):
    prompt = " a" * 120
    assert inf.count_tokens(prompt, raw=True) == 120
    r = inf.generate_text(model, prompt, max_new_tokens=8, temperature=0, raw=True, ignore_eos=True)  # fits exactly
    assert r["completion_tokens"] == 8
    with pytest.raises(ValueError, match=r"max_new_tokens.*block_size 128.*at most 8 ") as e:
        inf.generate_text(model, prompt, max_new_tokens=9, raw=True)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(ValueError, match="prompt is 200 tokens") as e:
        inf.generate_text(model, " a" * 200, max_new_tokens=1, raw=True)
    assert e.value.param == "prompt"


def test_should_stop_cancels(model):
    calls = []

    def stop_after_two_checks():
        calls.append(1)
        return len(calls) > 2

    r = inf.generate_text(model, "x", max_new_tokens=100, temperature=0, raw=True, ignore_eos=True,
                          should_stop=stop_after_two_checks)
    assert r["finish_reason"] == "cancelled" and 0 < r["completion_tokens"] < 100
    rows = inf.generate_batch(model, ["x", "y"], max_new_tokens=10, temperature=0, raw=True, ignore_eos=True,
                              should_stop=[lambda: True, None])
    assert rows[0]["finish_reason"] == "cancelled" and rows[0]["completion_tokens"] == 0
    assert rows[1]["finish_reason"] == "length"


def test_empty_raw_prompt_starts_from_endoftext(model):
    assert inf.encode_prompt("", raw=True) == [EOT_ID]
    r = inf.generate_text(model, "", max_new_tokens=3, temperature=0, raw=True, ignore_eos=True)
    assert r["prompt_tokens"] == 1 and r["completion_tokens"] == 3


def test_prompt_template_is_the_shared_one(model):
    from prompt import format_prompt
    from tokenizer import encode

    assert inf.encode_prompt("Name a colour.") == encode(format_prompt("Name a colour."))
    assert inf.encode_prompt("Name a colour.", raw=True) == encode("Name a colour.")


# ---------------------------------------------------------------- parameter validation

BAD_PARAMS = [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("max_new_tokens", "10"),
    ("max_new_tokens", True), ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")),
    ("temperature", "hot"), ("top_k", -1), ("top_k", N_VOCAB + 1), ("top_k", 1.5), ("top_p", 0),
    ("top_p", 1.01), ("top_p", -0.5), ("repetition_penalty", 0.9), ("repetition_penalty", 2.5),
    ("repetition_penalty", float("inf")), ("stop", ""), ("stop", ["a"] * 5), ("stop", [3]), ("stop", "x" * 65),
    ("stop", {"a": 1}), ("seed", -1), ("seed", 2**63), ("seed", "abc"), ("raw", "yes"), ("ignore_eos", 1),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS, ids=[f"{n}={v!r}"[:40] for n, v in BAD_PARAMS])
def test_invalid_parameter_is_a_clear_value_error(model, name, value):
    with pytest.raises(ValueError) as e:
        inf.generate_text(model, "hi", **{name: value})
    assert isinstance(e.value, inf.ParamError) and e.value.param == name
    msg = str(e.value)
    assert msg.startswith(name) and "got" in msg
    spec = inf.PARAM_RANGES[name]
    if spec.get("min") is not None:
        assert str(spec["min"]) in msg  # the allowed range is spelled out
    with pytest.raises(inf.ParamError):
        inf.validate_params(**{name: value})


def test_streaming_calls_validate_before_the_first_piece(model):
    with pytest.raises(inf.ParamError, match="temperature"):
        inf.stream_text(model, "hi", temperature=-1)  # raised at the call, not at next()
    with pytest.raises(inf.ParamError, match="top_p"):
        inf.stream_batch(model, ["a", "b"], top_p=[0.5, 7], max_new_tokens=5, raw=True)
    assert list(inf.stream_batch(model, [])) == []


def test_validate_params_normalizes_and_rejects_unknown():
    p = inf.validate_params(stop="###", max_new_tokens=64.0, temperature=0)
    assert p["stop"] == ("###",) and p["max_new_tokens"] == 64 and isinstance(p["max_new_tokens"], int)
    assert p["top_k"] == inf.PARAM_RANGES["top_k"]["default"] and p["seed"] is None
    with pytest.raises(inf.ParamError, match="unknown generation parameter 'beam'"):
        inf.validate_params(beam=4)
    assert inf.validate_params(stop=["a", "b", "a"])["stop"] == ("a", "b")


def test_prompt_must_be_text(model):
    with pytest.raises(inf.ParamError, match="prompt must be a string") as e:
        inf.generate_text(model, 42)
    assert e.value.param == "prompt"
    with pytest.raises(ValueError, match="has 1 values for 2 prompts"):
        inf.generate_batch(model, ["a", "b"], temperature=[0.5])


# ---------------------------------------------------------------- loading


def save_tiny(tmp_path, model, kind="sft"):
    return save_checkpoint(tmp_path / "run" / "ckpt.pt", kind=kind, model_state=model.state_dict(),
                           config=model.config.to_dict(), step=7, metrics={"val_loss": 3.5})


def test_load_our_checkpoint_file_and_folder(tmp_path, model):
    path = save_tiny(tmp_path, model)
    idx = torch.randint(0, N_VOCAB, (1, 9))
    for p in (path, tmp_path / "run"):
        loaded, info = inf.load_model_from_checkpoint(p, device="cpu")
        with torch.no_grad():
            assert (loaded(idx)[0] - model(idx)[0]).abs().max() < 1e-5  # (in, out) layout on CPU
        assert isinstance(loaded.lm_head, inf.InOutLinear) and isinstance(loaded.transformer.wte, inf.TiedEmbedding)
        assert info["kind"] == "sft" and info["step"] == 7 and info["instruction_tuned"]
        assert info["model"] == "run" and info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["n_params"] == model.num_params() and info["block_size"] == 128
        assert info["decode_mode"] == "eager" and not loaded.training


def test_in_out_layout_matches_linear(model):
    import copy

    fast = inf.use_in_out_layout(copy.deepcopy(model))
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert fast.lm_head.weight_t is fast.transformer.wte.weight_t  # still tied, one copy
    assert sum(p.numel() for p in fast.parameters()) == model.num_params()
    idx = torch.randint(0, N_VOCAB, (2, 11))
    with torch.no_grad():
        assert (fast(idx)[0] - model(idx)[0]).abs().max() < 1e-5
    kw = dict(max_new_tokens=20, temperature=0, raw=True, ignore_eos=True)
    assert inf.generate_text(fast, "Hi there", **kw)["token_ids"] == inf.generate_text(model, "Hi there", **kw)["token_ids"]


def test_load_hf_folder(tmp_path, model):
    model.export_hf(tmp_path / "hf")
    loaded, info = inf.load_model_from_checkpoint(tmp_path / "hf", device="cpu")
    idx = torch.randint(0, N_VOCAB, (1, 9))
    with torch.no_grad():
        assert (loaded(idx)[0] - model(idx)[0][..., :N_VOCAB]).abs().max() < 1e-4
    assert info["kind"] == "hf" and info["model"] == "hf" and not info["instruction_tuned"]


def test_load_openai_name_offline_is_clear(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="cannot load 'gpt2'.*Offline"):
        inf.load_model_from_checkpoint("gpt2", device="cpu")


@pytest.mark.parametrize("kwargs,match", [
    (dict(path="/nonexistent/ckpt.pt"), "not found"),
    (dict(path="not-a-model"), "model not found: 'not-a-model'"),
    (dict(quantize="int4"), "quantize must be 'int8'"),
    (dict(dtype="float8"), "unknown dtype"),
    (dict(device="tpu"), "unknown device"),
    (dict(quantize="int8", dtype="bfloat16"), "CPU in float32 only"),
])
def test_load_errors_are_one_line_user_errors(tmp_path, model, kwargs, match):
    kwargs.setdefault("path", save_tiny(tmp_path, model))
    kwargs.setdefault("device", "cpu")
    with pytest.raises(UserError, match=match) as e:
        inf.load_model_from_checkpoint(**kwargs)
    assert "\n" not in str(e.value)


def test_load_folder_without_model(tmp_path):
    with pytest.raises(UserError, match="holds neither ckpt.pt nor an HF model"):
        inf.load_model_from_checkpoint(tmp_path, device="cpu")


# ---------------------------------------------------------------- CLI


def test_cli_generates(tmp_path, model, capsys):
    path = save_tiny(tmp_path, model)
    assert inf.main(["--ckpt", str(path), "--prompt", "Hello", "--raw", "--temperature", "0",
                     "--max-new-tokens", "6", "--stream", "--verbose"]) == 0
    out, err = capsys.readouterr()
    expected = inf.generate_text(model, "Hello", max_new_tokens=6, temperature=0, raw=True)["text"]
    assert out == expected + "\n" and "completion_tokens=" in err


@pytest.mark.parametrize("argv,match", [
    (["--temperature", "-1"], "temperature must be a number between 0.0 and 2.0"),
    (["--top-k", "abc"], "invalid int value: 'abc'"),
    (["--stop", ""], "stop must be"),
    (["--max-new-tokens", "500"], "block_size 128"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, model, capsys, argv, match):
    path = save_tiny(tmp_path, model)
    with pytest.raises(SystemExit) as e:
        run_cli(inf.main, ["--ckpt", str(path), "--prompt", "hi", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err


def test_cli_help_and_missing_checkpoint_exit_codes(capsys):
    ok = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "--quantize" in ok.stdout and "--stream" in ok.stdout
    with pytest.raises(SystemExit) as e:
        run_cli(inf.main, ["--ckpt", "/nope/ckpt.pt", "--prompt", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not found" in err


def test_param_ranges_are_json_ready():
    import json

    json.dumps(inf.PARAM_RANGES)  # the server and chat page ship it as is
    assert set(inf.PARAM_RANGES) >= {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                     "stop", "seed", "raw"}
    assert math.isclose(inf.DEFAULTS["temperature"], 0.8)
