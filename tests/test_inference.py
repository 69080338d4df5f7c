"""inference.py on a tiny random GPT (CPU): the Engine's scheduling and exactness, the sampler, seeds, params,
loading, CLI."""

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, embed_all, tiny_config

import export_hf
import inference as inf
from checkpoint import save_checkpoint
from common import UserError, run_cli
from engine.cuda_graphs import bucket_steps, prefill_bucket
from model import GPT
from tokenizer import EOT_ID, N_VOCAB, decode

PROMPTS = ["a", "Hello there my friend, how are", "x y", "one two three four five six seven eight"]
MODES = {"eager": dict(), "static": dict(static=True, decode_chunk=3),
         "pipelined": dict(static=True, decode_chunk=2, pipeline=True)}
ENGINES = pytest.mark.parametrize("mode", list(MODES))
# every sampler parameter, and the four sampling paths (greedy, no filter, top-k candidates, full sort)
SAMPLERS = [
    dict(temperature=0),
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.5,
         frequency_penalty=0.7, logit_bias={11: 4.0, 13: -100, 290: 2.5}, seed=7),
    dict(temperature=1.1, top_k=0, seed=3),
    dict(temperature=0.7, top_k=0, top_p=0.8, frequency_penalty=-0.5, seed=5),
    dict(temperature=0, presence_penalty=1.5, logit_bias={"198": 3}),
]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval().requires_grad_(False)


def ids_of(text):
    return inf.encode_prompt(text, raw=True)


def params(**kw):
    return inf.validate_params(**dict(dict(raw=True, ignore_eos=True), **kw))


def run_all(engine):
    """Step until idle -> {request id: (token ids, finish reason)} and the number of steps."""
    got, steps = {}, 0
    while engine.has_work():
        steps += 1
        for o in engine.step():
            ids, _ = got.get(o.request_id, ([], None))
            got[o.request_id] = (ids + o.token_ids, o.finish_reason)
    return got, steps


def greedy_by_recompute(model, ids, n):
    """Reference: no cache, the whole sequence through the model every step (only the last position through
    the 50k-row lm_head: the logits of the others are unused, and cost 10x the rest of the step)."""
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model.lm_head(model.hidden(seq)[:, -1])
            nxt = logits[0, :N_VOCAB].argmax().item()
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


# ---------------------------------------------------------------- exactness


@ENGINES
def test_kv_cache_generation_equals_full_recompute(model, mode):
    engine = inf.Engine(model, max_batch=2, **MODES[mode])
    r = inf.generate_text(engine, "Hello there my friend", max_new_tokens=40, temperature=0, raw=True, ignore_eos=True)
    assert r["token_ids"] == greedy_by_recompute(model, ids_of("Hello there my friend"), 40)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 40


def test_static_mode_crosses_cache_buckets():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=300)).eval().requires_grad_(False)
    engine = inf.Engine(model, max_batch=2, static=True, decode_chunk=4)
    r = inf.generate_text(engine, "one two three", max_new_tokens=280, temperature=0, raw=True, ignore_eos=True)
    assert r["token_ids"] == greedy_by_recompute(model, ids_of("one two three"), 280)  # 128, 256, 300 positions


@ENGINES
def test_joining_mid_way_changes_nothing(model, mode):
    """Requests with every sampler parameter, added at different steps, finishing and leaving at
    different steps (more requests than slots, so some wait for a slot): each one's tokens equal
    its tokens alone.

    float64: alone, a prompt is prefilled in one piece; joined, in chunks of other sizes, and
    attention over 2 queries rounds differently from attention over 8. On random weights the
    distribution is nearly flat, so fp32 rounding alone can move an inverse-CDF boundary and flip
    a sampled token. float64 keeps the check about scheduling."""
    model = model.double()
    jobs = [(PROMPTS[i % 4] * (1 + i // 4), dict(SAMPLERS[i % len(SAMPLERS)], max_new_tokens=n))
            for i, n in enumerate([17, 4, 11, 23, 6, 9, 14])]
    alone = [inf.generate_text(model, p, raw=True, ignore_eos=True, **kw)["token_ids"] for p, kw in jobs]
    engine = inf.Engine(model, max_batch=4, prefill_chunk=6, **MODES[mode])
    reqs, got = [], {}
    join_at = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 8: [6]}  # step -> jobs added before it
    for step in range(200):
        for i in join_at.get(step, []):
            reqs.append(engine.add(ids_of(jobs[i][0]), params(**jobs[i][1])))
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
        if step > 8 and not engine.has_work():
            break
    assert [got[r.id] for r in reqs] == alone
    assert engine.stats().items() >= {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 4}.items()


@ENGINES
def test_same_seed_same_text_and_global_rng_untouched(model, mode):
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    before = torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()
    engine = inf.Engine(model, max_batch=2, **MODES[mode])
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=0, raw=True, ignore_eos=True)
    a = inf.generate_text(engine, "Once upon", seed=42, **kw)
    b = inf.generate_text(engine, "Once upon", seed=42, **kw)
    c = inf.generate_text(engine, "Once upon", seed=43, **kw)
    inf.generate_text(engine, "Once upon", seed=None, **kw)
    list(inf.stream_text(engine, "Once upon", seed=None, **kw))
    after = torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()
    assert a["text"] == b["text"] and a["token_ids"] == b["token_ids"]
    assert c["token_ids"] != a["token_ids"]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_batch_equals_single_greedy_with_long_prompt_and_long_generation(model):
    prompts = PROMPTS + [" ".join(["word"] * 90)]  # 90 + 30 and short prompts + 30: rows at very different positions
    single = [inf.generate_text(model, p, max_new_tokens=30, temperature=0, raw=True) for p in prompts]
    batch = inf.generate_batch(model, prompts, max_new_tokens=30, temperature=0, raw=True)
    for s, b in zip(single, batch):
        assert b == s


# ---------------------------------------------------------------- scheduling


@ENGINES
def test_newcomer_gets_its_first_token_while_long_requests_run(model, mode):
    engine = inf.Engine(model, max_batch=4, **MODES[mode])
    longs = [engine.add(ids_of(p), params(max_new_tokens=100, temperature=0)) for p in PROMPTS[:2]]
    for _ in range(3):
        engine.step()
    short = engine.add(ids_of("x y"), params(max_new_tokens=5, temperature=0))
    steps = 0
    while True:
        steps += 1
        if any(o.request_id == short.id and o.token_ids for o in engine.step()):
            break
    assert steps == 1 and not any(r.done for r in longs)
    assert engine.stats()["running"] == 3


def test_chunked_prefill_never_stalls_running_rows(model):
    engine = inf.Engine(model, max_batch=2, prefill_chunk=8)
    running = engine.add(ids_of("a"), params(max_new_tokens=60, temperature=0))
    engine.step()
    long_prompt = ids_of(" ".join(["word"] * 50))
    late = engine.add(long_prompt, params(max_new_tokens=5, temperature=0))
    per_step, first_at = [], None
    for step in range(1, 12):
        outs = engine.step()
        per_step.append(sum(len(o.token_ids) for o in outs if o.request_id == running.id))
        if first_at is None and any(o.request_id == late.id and o.token_ids for o in outs):
            first_at = step
    assert per_step == [1] * 11  # one token every step while 50 prompt tokens prefill 8 at a time
    assert first_at == math.ceil(50 / 8)
    run_all(engine)
    assert running.done and late.done


@ENGINES
def test_cancel_frees_the_slot(model, mode):
    engine = inf.Engine(model, max_batch=2, **MODES[mode])
    a = engine.add(ids_of("a"), params(max_new_tokens=50, temperature=0))
    b = engine.add(ids_of("b"), params(max_new_tokens=50, temperature=0), n=2)  # waits: one slot left
    engine.step()
    assert engine.stats().items() >= {"running": 1, "waiting": 1, "slots_used": 1, "slots_total": 2}.items()
    engine.cancel(b)
    outs = engine.step()
    assert sorted(o.finish_reason for o in outs if o.request_id == b.id) == ["cancelled", "cancelled"]
    assert b.done and engine.stats()["waiting"] == 0
    engine.cancel(a)
    ends = [o for _ in range(3) for o in engine.step() if o.finish_reason]
    assert [(o.request_id, o.finish_reason) for o in ends] == [(a.id, "cancelled")]
    assert ends[0].usage["completion_tokens"] < 50 and a.done
    assert engine.stats().items() >= {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 2}.items()
    assert not engine.has_work() and engine.step() == []


# ---------------------------------------------------------------- logprobs, echo, n, embeddings


@pytest.mark.parametrize("mode", ["eager", "pipelined"])
def test_logprobs_are_raw_log_softmax_of_a_full_forward(model, mode):
    engine = inf.Engine(model, max_batch=2, prefill_chunk=4, **MODES[mode])
    prompt = ids_of("Hello there my friend")
    req = engine.add(prompt, params(max_new_tokens=12, temperature=0.8, top_k=20, repetition_penalty=1.5, seed=1),
                     logprobs=5, echo=True)
    outs = [o for o in run_all_outputs(engine)]
    tokens = [t for o in outs for t in o.token_ids]
    entries = [e for o in outs for e in o.logprobs]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0][0, :, :N_VOCAB].float(), dim=-1)
    assert len(entries) == len(tokens) == 12
    for i, (t, e) in enumerate(zip(tokens, entries)):
        row = ref[len(prompt) - 1 + i]
        assert e["token_id"] == t and abs(e["logprob"] - row[t].item()) < 1e-4
        assert [i for i, _ in e["top"]] == row.topk(5).indices.tolist()
        assert all(abs(lp - row[i].item()) < 1e-4 for i, lp in e["top"])
    plp = outs[0].prompt_logprobs
    assert len(plp.logprob) == len(plp.top_ids) == len(plp.top_logprobs) == len(prompt) - 1
    for i in range(1, len(prompt)):
        assert abs(plp.logprob[i - 1] - ref[i - 1, prompt[i]].item()) < 1e-4
        assert plp.top_ids[i - 1].tolist() == ref[i - 1].topk(5).indices.tolist()
    assert req.done and all(o.prompt_logprobs is None for o in outs[1:])


def run_all_outputs(engine):
    while engine.has_work():
        yield from engine.step()


def test_echo_with_no_new_tokens(model):
    engine = inf.Engine(model, max_batch=1, prefill_chunk=3)
    prompt = ids_of("The quick brown fox jumps")
    req = engine.add(prompt, params(max_new_tokens=0), echo=True, logprobs=0)
    outs = list(run_all_outputs(engine))
    assert len(outs) == 1 and outs[0].finish_reason == "length" and outs[0].token_ids == []
    assert outs[0].usage == {"prompt_tokens": len(prompt), "completion_tokens": 0} and req.done
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0][0, :, :N_VOCAB], dim=-1)
    plp = outs[0].prompt_logprobs
    want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert np.allclose(plp.logprob, want, atol=1e-4) and plp.top_ids.shape == plp.top_logprobs.shape == (len(want), 0)
    with pytest.raises(inf.ParamError, match="0 only with echo") as e:  # checked at the edge
        inf.fit(len(prompt), params(max_new_tokens=0), engine.config.block_size)
    assert e.value.param == "max_new_tokens"


@ENGINES
def test_n_choices_share_one_prefill(model, mode):
    engine = inf.Engine(model, max_batch=4, **MODES[mode])
    prompt = ids_of("Tell me a story")

    def choices(**kw):
        req = engine.add(prompt, params(max_new_tokens=10, **kw), n=3)
        got = {}
        for o in run_all_outputs(engine):
            got.setdefault(o.index, []).extend(o.token_ids)
        assert req.done
        return [got[i] for i in range(3)]

    greedy = choices(temperature=0)
    assert greedy[0] == greedy[1] == greedy[2] == greedy_by_recompute(model, prompt, 10)
    sampled = choices(temperature=1.0, top_k=0, seed=11)
    assert len({tuple(s) for s in sampled}) == 3 and choices(temperature=1.0, top_k=0, seed=11) == sampled
    for i in range(3):  # choice i samples with seed + i
        assert inf.generate_text(model, "Tell me a story", max_new_tokens=10, temperature=1.0, top_k=0, seed=11 + i,
                                 raw=True, ignore_eos=True)["token_ids"] == sampled[i]


def test_embed_is_mean_pooled_and_normalised(model):
    engine = inf.Engine(model, max_batch=1)
    inputs = [ids_of("Hello world"), ids_of("a b c d e")]
    got = embed_all(engine, inputs)
    for ids, e in zip(inputs, got):
        with torch.no_grad():
            h = model.hidden(torch.tensor([ids]))[0].mean(0)
        assert np.allclose(e, (h / h.norm()).tolist(), atol=1e-5) and abs(np.linalg.norm(e) - 1) < 1e-5
    with pytest.raises(inf.ParamError) as e:
        embed_all(engine, [[1, N_VOCAB]])
    assert e.value.param == "input"


# ---------------------------------------------------------------- the sampler


def sample(logits, u, top_k, top_p, n_cand, temperature=1.0, min_p=0.0, penalties=None):
    B = logits.size(0)
    p = inf.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = torch.tensor([inf.param_row(p)] * B)
    return inf.sample(logits, rows, u, n_cand, penalties)


def test_sample_follows_filtered_distribution():
    """Inverse-CDF sampling with top-k / top-p / min-p / temperature gives the expected frequencies.

    u on an evenly spaced grid (a stratified sample): every id then gets its probability's share of the grid to
    within one point, 1/n, where n random u's would need ~100x more rows for the same bound."""
    logits = torch.full((1, N_VOCAB), -30.0)
    logits[0, [10, 20, 30, 40]] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 200
    u = (torch.arange(n, dtype=torch.float32)[:, None] + 0.5) / n

    def freqs(top_k=0, top_p=1.0, n_cand=inf.TOPK_CANDIDATES, **kw):
        ids = sample(logits.expand(n, -1), u, top_k, top_p, n_cand, **kw)
        return [(ids == t).float().mean().item() for t in (10, 20, 30, 40)]

    def close(got, want):
        return all(abs(g - w) <= 1 / n for g, w in zip(got, want))

    assert close(freqs(n_cand=-1), [0.5, 0.3, 0.15, 0.05])  # no filter, no sort
    assert close(freqs(top_k=2), [0.625, 0.375, 0, 0])  # renormalised over the top 2
    assert close(freqs(top_k=256, top_p=0.7), [0.625, 0.375, 0, 0])  # 0.5 + 0.3 reaches 0.7
    assert close(freqs(top_k=256, top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert close(freqs(n_cand=-1, min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])  # 0.05 < 0.2 * 0.5
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert close(freqs(top_k=256, temperature=0.5), (p2 / p2.sum()).tolist())  # p^(1/T)


def test_sampling_paths_pick_the_same_ids():
    """topk, full sort and no-sort paths choose the same id for the same u: batch composition
    (which decides the path) never changes a seeded row's text."""
    torch.manual_seed(1)
    logits = torch.randn(24, N_VOCAB) * 3
    u = torch.rand(24, 1)
    a = sample(logits, u, top_k=40, top_p=0.9, n_cand=inf.TOPK_CANDIDATES)
    b = sample(logits, u, top_k=40, top_p=0.9, n_cand=N_VOCAB)
    assert torch.equal(a, b)
    c = sample(logits, u, top_k=0, top_p=1.0, n_cand=-1)
    d = sample(logits, u, top_k=0, top_p=1.0, n_cand=N_VOCAB)
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_tiny_temperature_and_top_p_are_greedy(model):
    """1e-39 and 1e-300 underflow float32: they must act like greedy, never as 'token 0'."""
    logits = torch.randn(4, N_VOCAB) * 3
    best = logits.argmax(-1)
    u = torch.rand(4, 1)
    for kw, paths in ((dict(temperature=1e-39, top_k=0, top_p=1.0), (-1, 256, N_VOCAB)),
                      (dict(temperature=1e-30, top_k=0, top_p=1.0), (-1, N_VOCAB)),  # a float32 temperature
                      (dict(temperature=1.0, top_k=0, top_p=1e-300), (N_VOCAB,)),
                      (dict(temperature=1.0, top_k=50, top_p=1e-300), (256, N_VOCAB))):
        for n_cand in paths:
            assert torch.equal(sample(logits, u, n_cand=n_cand, **kw), best)
    greedy = inf.generate_text(model, "The cat", max_new_tokens=15, temperature=0, raw=True)["token_ids"]
    for kw in (dict(temperature=1e-39), dict(temperature=1.0, top_p=1e-300), dict(temperature=1.3, top_k=1)):
        assert inf.generate_text(model, "The cat", max_new_tokens=15, seed=5, raw=True, **kw)["token_ids"] == greedy


def test_penalties_and_logit_bias_as_defined():
    logits = torch.zeros(1, N_VOCAB)
    logits[0, 1], logits[0, 2], logits[0, 3], logits[0, 4] = 2.0, 1.5, -1.0, 1.9
    greedy = inf.SamplingParams(temperature=0)

    def pick(seen=(), counts=None, bias=None, **kw):
        p = torch.tensor([inf.param_row(greedy.replace(**kw))])
        s = torch.zeros(1, N_VOCAB, dtype=torch.bool)
        s[0, list(seen)] = True
        c = torch.zeros(1, N_VOCAB)
        for t, n in (counts or {}).items():
            c[0, t] = n
        b = torch.zeros(1, N_VOCAB)
        for t, v in (bias or {}).items():
            b[0, t] = v
        return inf.sample(logits, p, torch.zeros(1, 1), 0, (b, s, c)).item()

    assert pick() == 1
    assert pick(seen=[1], repetition_penalty=1.5) == 4  # CTRL: 2.0 / 1.5 < 1.9
    assert pick(counts={1: 1}, presence_penalty=0.2) == 4  # 2.0 - 0.2 < 1.9
    assert pick(counts={1: 1}, presence_penalty=0.05) == 1
    assert pick(counts={1: 3}, frequency_penalty=0.05) == 4  # 2.0 - 3 * 0.05 < 1.9
    assert pick(counts={1: 1}, frequency_penalty=0.05) == 1
    assert pick(counts={1: 3}, frequency_penalty=-0.5) == 1  # negative: encourages repeats
    assert pick(bias={3: 100}) == 3 and pick(bias={1: -100}) == 4


def test_logit_bias_bans_and_forces_tokens(model):
    kw = dict(max_new_tokens=12, temperature=0, raw=True, ignore_eos=True)
    plain = inf.generate_text(model, "a", **kw)["token_ids"]
    banned = inf.generate_text(model, "a", logit_bias={str(plain[0]): -100}, **kw)["token_ids"]
    assert plain[0] not in banned
    forced = inf.generate_text(model, "a", logit_bias={464: 100}, seed=1, **dict(kw, temperature=1.0))["token_ids"]
    assert forced == [464] * 12


def test_frequency_and_presence_penalties_reduce_repeats(model):
    kw = dict(max_new_tokens=40, temperature=0, raw=True)
    plain = inf.generate_text(model, "a", **kw)["token_ids"]
    for pen in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(repetition_penalty=2.0)):
        assert len(set(inf.generate_text(model, "a", **pen, **kw)["token_ids"])) > len(set(plain))


def test_sampling_never_returns_padding_ids(model):
    with torch.no_grad():  # make the padded vocab rows (>= 50257) by far the most likely
        model.lm_head.weight[N_VOCAB:] = model.lm_head.weight[:N_VOCAB].abs().max() * 50
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=0, seed=1), dict(temperature=1.0, top_k=50, seed=1)):
        r = inf.generate_text(model, "x", max_new_tokens=10, raw=True, ignore_eos=True, **kw)
        assert max(r["token_ids"]) < N_VOCAB


def test_sampler_kind():
    p = inf.validate_params
    assert inf.sampler_kind([p(temperature=0), p(temperature=0)]) == (0, False, False, False)
    assert inf.sampler_kind([p(temperature=0), p(temperature=0.5, top_k=0)], logprobs=True) == (-1, False, True, False)
    assert inf.sampler_kind([p(temperature=0.5, top_k=40, top_p=0.9), p(temperature=0.5, top_k=0)])[0] == N_VOCAB
    assert inf.sampler_kind([p(temperature=0.5), p(temperature=0, repetition_penalty=1.2)]) == (256, True, False, False)
    assert inf.sampler_kind([p(temperature=0, logit_bias={1: 1})])[1]


# ---------------------------------------------------------------- results and limits


def test_finish_reasons_and_usage(model):
    r = inf.generate_text(model, "Hello", max_new_tokens=7, temperature=0, raw=True)
    assert r["finish_reason"] in ("length", "eos")
    assert r["prompt_tokens"] == 1 and r["completion_tokens"] == len(r["token_ids"]) <= 7
    assert r["text"] == decode([t for t in r["token_ids"] if t != EOT_ID])
    t = inf.generate_text(model, "Hello", max_new_tokens=1, temperature=0)  # the template counts
    assert t["prompt_tokens"] == len(inf.encode_prompt("Hello")) > 20


def test_eos_ends_generation(model):
    with torch.no_grad():  # every final hidden state = ones, and only <|endoftext|> points along it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[EOT_ID] = 1.0
    r = inf.generate_text(model, "Hi", max_new_tokens=20, temperature=0, raw=True)
    assert r["finish_reason"] == "eos" and r["completion_tokens"] == 1 and r["text"] == ""
    assert r["token_ids"] == [EOT_ID]
    r = inf.generate_text(model, "Hi", max_new_tokens=3, temperature=0, raw=True, ignore_eos=True)
    assert r["finish_reason"] == "length" and r["text"] == "<|endoftext|>" * 3


def test_block_size_overflow_is_a_clear_error(model):
    prompt = " a" * 120
    assert len(inf.encode_prompt(prompt, raw=True)) == 120
    r = inf.generate_text(model, prompt, max_new_tokens=8, temperature=0, raw=True, ignore_eos=True)  # fits exactly
    assert r["completion_tokens"] == 8
    with pytest.raises(ValueError, match=r"max_new_tokens.*block_size 128.*at most 8 ") as e:
        inf.generate_text(model, prompt, max_new_tokens=9, raw=True)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(ValueError, match="prompt is 200 tokens") as e:
        inf.generate_text(model, " a" * 200, max_new_tokens=1, raw=True)
    assert e.value.param == "prompt"


def test_bad_prompt_ids_are_param_errors():
    for ids in ([], [1, N_VOCAB], [1, -1], "abc"):  # the edge's check (n and logprobs: the server's schema)
        with pytest.raises(inf.ParamError) as e:
            inf.check_ids(ids)
        assert e.value.param == "prompt"


def test_empty_raw_prompt_starts_from_endoftext(model):
    assert inf.encode_prompt("", raw=True) == [EOT_ID]
    r = inf.generate_text(model, "", max_new_tokens=3, temperature=0, raw=True, ignore_eos=True)
    assert r["prompt_tokens"] == 1 and r["completion_tokens"] == 3


def test_prompt_template_is_the_shared_one():
    from prompt import format_prompt
    from tokenizer import encode

    assert inf.encode_prompt("Name a colour.") == encode(format_prompt("Name a colour."))
    assert inf.encode_prompt("Name a colour.", raw=True) == encode("Name a colour.")


# ---------------------------------------------------------------- parameter validation

BAD_PARAMS = [
    ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("max_new_tokens", "10"),
    ("max_new_tokens", True), ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")),
    ("temperature", "hot"), ("top_k", -1), ("top_k", N_VOCAB + 1), ("top_k", 1.5), ("top_p", 0),
    ("top_p", 1.01), ("top_p", -0.5), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.9),
    ("repetition_penalty", 2.5), ("repetition_penalty", float("inf")), ("presence_penalty", 2.1),
    ("frequency_penalty", -2.5), ("logit_bias", {"1": 101}), ("logit_bias", {"abc": 1}),
    ("logit_bias", {N_VOCAB: 1}), ("logit_bias", [1, 2]), ("logit_bias", {str(i): 1 for i in range(301)}),
    ("stop", ""), ("stop", ["a"] * 5), ("stop", [3]), ("stop", "x" * 65), ("stop", {"a": 1}), ("seed", -1),
    ("seed", 2**63), ("seed", "abc"), ("raw", "yes"), ("ignore_eos", 1),
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


def test_streaming_validates_before_the_first_piece(model):
    with pytest.raises(inf.ParamError, match="temperature"):
        inf.stream_text(model, "hi", temperature=-1)  # raised at the call, not at next()


def test_validate_params_normalizes_and_rejects_unknown():
    p = inf.validate_params(stop="###", max_new_tokens=64.0, temperature=0, logit_bias={"50256": -100, 7: 1})
    assert p.stop == ("###",) and p.max_new_tokens == 64 and isinstance(p.max_new_tokens, int)
    assert p.logit_bias == {50256: -100.0, 7: 1.0}
    assert p.top_k == inf.PARAM_RANGES["top_k"]["default"] and p.seed is None
    with pytest.raises(inf.ParamError, match="unknown generation parameter 'beam'"):
        inf.validate_params(beam=4)
    assert inf.validate_params(stop=["a", "b", "a"]).stop == ("a", "b")


def test_prompt_must_be_text(model):
    with pytest.raises(inf.ParamError, match="prompt must be a string") as e:
        inf.generate_text(model, 42)
    assert e.value.param == "prompt"


def test_param_ranges_are_json_ready():
    import json

    json.dumps(inf.PARAM_RANGES)  # the server and chat page ship it as is
    assert set(inf.PARAM_RANGES) >= {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                     "presence_penalty", "frequency_penalty", "logit_bias", "stop", "seed", "raw"}
    assert math.isclose(inf.PARAM_RANGES["temperature"]["default"], 0.8)


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
        assert info["name"] == "run" and info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["n_params"] == model.num_params() and info["config"]["block_size"] == 128 and not loaded.training


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
    export_hf.export(model, tmp_path / "hf")
    loaded, info = inf.load_model_from_checkpoint(tmp_path / "hf", device="cpu")
    idx = torch.randint(0, N_VOCAB, (1, 9))
    with torch.no_grad():
        assert (loaded(idx)[0] - model(idx)[0][..., :N_VOCAB]).abs().max() < 1e-4
    assert info["kind"] == "hf" and info["name"] == "hf" and not info["instruction_tuned"]


def test_load_openai_name_offline_is_clear(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="could not download 'gpt2'.*offline"):
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
    with pytest.raises(UserError, match="holds neither ckpt.pt nor an HF GPT-2 model"):
        inf.load_model_from_checkpoint(tmp_path, device="cpu")


# ---------------------------------------------------------------- CLI


def test_cli_generates(tmp_path, model, capsys):
    path = save_tiny(tmp_path, model)
    assert inf.main(["--ckpt", str(path), "--prompt", "Hello", "--raw", "--temperature", "0",
                     "--max-new-tokens", "6", "--stream", "--verbose"]) == 0
    out, err = capsys.readouterr()
    expected = inf.generate_text(model, "Hello", max_new_tokens=6, temperature=0, raw=True)["text"]
    assert out == expected + "\n" and "completion_tokens=" in err
    assert inf.main(["--ckpt", str(path), "--prompt", "Hello", "--raw", "--temperature", "0",
                     "--max-new-tokens", "6", "--frequency-penalty", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("argv,match", [
    (["--temperature", "-1"], "temperature must be a number between 0.0 and 2.0"),
    (["--top-k", "abc"], "invalid int value: 'abc'"),
    (["--stop", ""], "stop must be"),
    (["--max-new-tokens", "500"], "block_size 128"),
    (["--max-new-tokens", "0"], "0 only with echo"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt", ""], "prompt must not be empty (an empty prompt is allowed with --raw)"),  # as the API
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
    assert "(default: 128)" in ok.stdout and "(default: 0.8)" in ok.stdout  # every default shown
    with pytest.raises(SystemExit) as e:
        run_cli(inf.main, ["--ckpt", "/nope/ckpt.pt", "--prompt", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not found" in err


def test_echo_of_a_prompt_filling_the_whole_context(model):
    engine = inf.Engine(model, max_batch=2, static=True)
    running = engine.add(ids_of("a"), params(max_new_tokens=40, temperature=0))
    first = sum(len(o.token_ids) for o in engine.step())
    full = engine.add(list(range(1000, 1128)), params(max_new_tokens=0), echo=True)  # 128 = block_size
    got, _ = run_all(engine)
    assert got[full.id] == ([], "length") and got[running.id][1] == "length"
    assert first + len(got[running.id][0]) == 40


@pytest.mark.parametrize("max_batch,block", [(64, 1024), (33, 1024), (8, 2048), (4, 64)])
def test_prefill_warmup_covers_every_step_shape(max_batch, block):
    """Every step the scheduler can make (up to max_batch rows of 1..block_size tokens) either has more tokens
    than a graph holds or falls in a bucket that warm-up captures: no request waits for a capture."""
    rng, warmed = random.Random(0), {prefill_bucket(x, max_batch, block) for x in bucket_steps(max_batch, block)}
    for _ in range(2000):
        cap = rng.choice([8, 128, 129, block])  # short rests, a row just past a query bucket, anything
        lengths = [rng.randint(1, min(cap, block)) for _ in range(rng.randint(1, max_batch))]
        key = prefill_bucket(lengths, max_batch, block)
        assert key in warmed if key is not None else sum(lengths) > 8192
