"""The prefix cache (engine/prefix_cache.py) changes what is computed, never what comes out: an engine with
it gives, in float64, the tokens and logprobs of one without it, for every sampler parameter, prompts that
share no, some or all blocks, echo requests, eviction under pressure; the pool stays within its bound.
Embeddings batched into a step equal embeddings one at a time."""

import random

import pytest
import torch
from conftest import embed_all, tiny_config

import inference as inf
from engine.prefix_cache import BLOCK_TOKENS as T
from model import GPT
from tokenizer import N_VOCAB

SAMPLERS = [dict(temperature=0),
            dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.5,
                 frequency_penalty=0.7, logit_bias={11: 4.0, 13: -100}, seed=7),
            dict(temperature=1.1, top_k=0, seed=3),
            dict(temperature=0.7, top_p=0.8, frequency_penalty=-0.5, seed=5)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=128)).eval().requires_grad_(False).double()


def ids_of(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(N_VOCAB) for _ in range(n)]


BASE = ids_of(5 * T + 3, 1)
PROMPTS = [BASE,  # cold
           BASE,  # again: every full block but the last token's
           BASE[:3 * T] + ids_of(2 * T + 7, 2),  # shares 3 blocks, then differs
           ids_of(4 * T, 3),  # shares none
           BASE[:4 * T] + ids_of(1, 4),  # a block boundary just before the last token
           BASE[:5 * T]]  # whole blocks: the last one is prefilled


def run(engine, jobs, together):
    """jobs [(ids, params, kw)] one after another, or all added before the first step -> per job
    (token ids of each choice, logprobs of each choice, prompt logprobs)."""
    reqs, got = [], {}

    def drain():
        while engine.has_work():
            for o in engine.step():
                ids, lps, echo = got.setdefault((o.request_id, o.index), ([], [], []))
                ids += o.token_ids
                lps += [(e["token_id"], round(e["logprob"], 6), [t for t, _ in e["top"]]) for e in o.logprobs or []]
                plp = o.prompt_logprobs
                echo += list(zip([round(x, 6) for x in plp.logprob.tolist()], plp.top_ids.tolist())) if plp else []

    for ids, p, kw in jobs:
        reqs.append(engine.add(ids, inf.validate_params(**dict(p, ignore_eos=True)), **kw))
        if not together:
            drain()
    drain()
    return [[got[(r.id, i)] for i in range(r.n)] for r in reqs]


def engines(model, prefill_chunk=48, **kw):
    return [inf.Engine(model, max_batch=4, prefill_chunk=prefill_chunk, prefix_cache=on, **kw) for on in (True, False)]


def test_cache_on_gives_what_cache_off_gives(model):
    """Prompts one after another (each finds what the ones before stored), then all at once on a cold
    cache (admitted together: a prompt waits a step for a long prefix another is prefilling); every sampler,
    n=2 and logprobs too."""
    jobs = [(ids, dict(SAMPLERS[i % 4], max_new_tokens=3 + i % 3), dict(n=1 + i % 2, logprobs=2))
            for i, ids in enumerate(PROMPTS)]
    for together in (False, True):
        on, off = engines(model, 256 if together else 48)  # together: several admitted in one step
        assert run(on, jobs, together) == run(off, jobs, together)
        s = on.stats()["prefix_cache"]
        assert s["hits"] == 4 and s["hit_tokens"] == 16 * T and off.stats()["prefix_cache"]["hits"] == 0


def test_only_a_long_shared_prefix_is_waited_for(model):
    """Two prompts sharing 3 blocks and an unrelated third, added together: under a 2,048-token step budget all
    start at once (48 shared tokens cost less to prefill twice than a step's wait); under 512, the second waits
    a step and reuses them, and the third, behind it in the queue, starts meanwhile."""
    ctx = ids_of(3 * T + 5, 50)
    for budget, waiting, hits in ((2048, 0, 0), (512, 1, 1)):
        engine = inf.Engine(model, max_batch=4, prefill_chunk=budget)
        for i in range(2):
            engine.add(ctx + ids_of(4, 51 + i), inf.validate_params(max_new_tokens=1, ignore_eos=True))
        engine.add(ids_of(20, 60), inf.validate_params(max_new_tokens=1, ignore_eos=True))
        engine.step()
        assert engine.stats()["waiting"] == waiting
        while engine.has_work():
            engine.step()
        assert engine.stats()["prefix_cache"]["hits"] == hits


def test_cached_greedy_equals_full_recompute(model):
    engine = inf.Engine(model, max_batch=2)
    for _ in range(2):
        got = run(engine, [(BASE, dict(temperature=0, max_new_tokens=8), {})], False)
    assert engine.stats()["prefix_cache"]["hits"] == 1
    seq = torch.tensor([BASE])
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[0][:, -1:, :N_VOCAB].argmax(-1)], dim=1)
    assert got[0][0][0] == seq[0, -8:].tolist()


@pytest.mark.parametrize("pipelined", [False, True])
def test_echo_logprobs_reuse_stored_entries(model, pipelined):
    """lm-eval's loglikelihood shape: one context with several endings, echo + logprobs, 1 new token (and
    pipelined: a step without a decode chunk reads its prefill's results at the next step). Requests of one
    step asking for different numbers of alternatives each get theirs."""
    ctx = ids_of(4 * T + 5, 8)
    jobs = [(ctx + ids_of(3 + i, 9 + i), dict(temperature=0, max_new_tokens=1), dict(logprobs=k, echo=True))
            for i, k in enumerate((1, 3, 0))]
    jobs += [(ctx + ids_of(6, 20), dict(temperature=0, max_new_tokens=0), dict(logprobs=2, echo=True))]
    on, off = engines(model, **(dict(static=True, pipeline=True) if pipelined else {}))
    alone = run(off, jobs, False)
    for (ids, _, kw), [(_, _, echo)] in zip(jobs, alone):
        assert len(echo) == len(ids) - 1 and all(len(top) == kw["logprobs"] for _, top in echo)
    for together in (False, True):
        assert run(on, jobs, together) == run(off, jobs, together) == alone
    assert on.stats()["prefix_cache"]["hits"] >= len(jobs)


def test_eviction_under_pressure_keeps_outputs_and_the_bound(model):
    on = inf.Engine(model, max_batch=4, prefix_cache_mb=6 * (2 * 2 * T * 64 * 8) / 2**20)  # a 6-block pool
    off = inf.Engine(model, max_batch=4, prefix_cache=False)
    pool = on.runner.prefix.kv
    assert pool.shape[1] == 6 and off.runner.prefix.kv is None
    prompts = [ids_of(2 * T + 3 + i, 20 + i) for i in range(4)] * 2
    jobs = [(ids, dict(SAMPLERS[i % 4], max_new_tokens=2), dict(logprobs=1)) for i, ids in enumerate(prompts)]
    for together in (False, True):
        assert run(on, jobs, together) == run(off, jobs, together)
        s = on.stats()["prefix_cache"]
        assert s["blocks_used"] <= s["blocks_total"] == 6 and on.runner.prefix.kv is pool and pool.shape[1] == 6
    assert s["evicted_blocks"] > 0 and s["hits"] > 0


def test_embeddings_batched_in_steps_equal_one_at_a_time(model):
    inputs = [ids_of(n, n) for n in (5, 40, 1, 17, 33, 8)]
    engine = inf.Engine(model, max_batch=2, prefill_chunk=64)
    alone = [embed_all(engine, [x])[0] for x in inputs]
    assert embed_all(engine, inputs) == alone
    engine.add_embedding("a", inputs[:4])
    engine.add_embedding("b", inputs[4:])
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert {job: vectors.tolist() for job, vectors in engine.embedded} == {"a": alone[:4], "b": alone[4:]}
    assert 2 <= steps < len(inputs)  # a 64-token budget, padding included: several inputs a step, never all in one


def test_a_loaded_prefix_waiting_for_its_prefill_is_not_overwritten(model):
    """A request admitted with a cached prefix but not prefilled in that step (another prompt's padding
    would run past the cache) sits in a slot that idle decode rows write to: not into its prefix."""
    outs = []
    for on in (True, False):
        engine = inf.Engine(model, max_batch=4, prefix_cache=on)
        greedy = dict(temperature=0, max_new_tokens=1)
        run(engine, [(BASE, greedy, {})], False)  # stored (when on)
        short = [(ids_of(5, 30 + i), dict(greedy, max_new_tokens=1 + 40 * (i % 2)), {}) for i in range(4)]
        jobs = short + [(ids_of(100, 40), greedy, {}),
                        (BASE[:5 * T] + ids_of(6, 41), dict(greedy, max_new_tokens=4), {})]
        reqs = [engine.add(ids, inf.validate_params(**dict(p, ignore_eos=True))) for ids, p, _ in jobs[:4]]
        engine.step()  # slots 0 and 2 done after one token, 1 and 3 decoding
        reqs += [engine.add(ids, inf.validate_params(**dict(p, ignore_eos=True)), logprobs=0) for ids, p, _ in jobs[4:]]
        got = {}
        while engine.has_work():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend((t, round(e["logprob"], 6)) for t, e in zip(o.token_ids,
                                                                                                    o.logprobs or []))
        outs.append(got[reqs[-1].id])
        assert [c.slot for c in reqs[-1].choices] == [None]
    assert outs[0] == outs[1]
