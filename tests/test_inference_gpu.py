"""The Engine on CUDA: CUDA-graph decode steps (with and without torch.compile) give the same tokens as
the uncaptured static path and the eager path; requests joining mid-way change nothing; packed prefill
steps replayed from CUDA graphs equal the uncaptured forward.

Skipped without CUDA. On the GPU machine: python -m pytest tests/test_inference_gpu.py -v
"""

import pytest
import torch
from conftest import embed_all

import inference as inf
from engine.model_runner import _call_model
from grammar import make_constraint
from model import GPT, GPTConfig, pack, varlen_causal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["a", "Hello there my friend, how are you today?", "x y", " ".join(["word"] * 40)]


def gpt2_124m(dtype):
    torch.manual_seed(0)
    return GPT(GPTConfig()).eval().requires_grad_(False).to(device="cuda", dtype=dtype)


def run(model, prompts, **engine):
    def go(**kw):
        e = inf.Engine(model, max_batch=8, **engine)
        kw = dict(dict(max_new_tokens=300, temperature=0, raw=True, ignore_eos=True), **kw)
        return [r["token_ids"] for r in inf.generate_batch(e, prompts, **kw)], e
    return go


# fp32 for every sampler: captured and uncaptured steps agree to ~1e-7, so the same uniforms pick the
# same tokens. bf16 is not compared token for token, not even greedy: under capture cuBLAS may pick
# other GEMM algorithms, and on random weights the top two logits are often closer than bf16's
# rounding (~1e-3), so a greedy run can take the other branch mid-way (seen on an H200). That is
# rounding, not a replay bug; the server benchmark runs bf16 graphs end to end.
SAMPLERS = {
    "greedy-fp32": (torch.float32, dict(temperature=0)),
    "topk-fp32": (torch.float32, dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=3)),
    "pure-fp32": (torch.float32, dict(temperature=1.0, top_k=0, seed=4)),
    "penalties-fp32": (torch.float32, dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.01, presence_penalty=0.5,
                                           frequency_penalty=0.3, logit_bias={262: 2.0, 11: -100}, seed=5)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_graph_replays_equal_uncaptured_static_steps(name):
    """Same computation, captured or not: identical tokens (300 new tokens cross the 128/256/384 buckets)."""
    dtype, sampling = SAMPLERS[name]
    model = gpt2_124m(dtype)
    for prompts in (PROMPTS[:1], PROMPTS):
        static, _ = run(model, prompts, graphs=False, static=True)(**sampling)
        graphs, engine = run(model, prompts, graphs=True)(**sampling)
        assert engine.runner.graphs.enabled and not engine.notes and engine.runner.graphs.graphs
        assert graphs == static


def test_logprobs_in_graphs_equal_eager_fp32():
    model = gpt2_124m(torch.float32)
    ids = inf.encode_prompt(PROMPTS[1], raw=True)
    got = []
    for engine in (inf.Engine(model, max_batch=4, graphs=False), inf.Engine(model, max_batch=4, graphs=True)):
        req = engine.add(ids, inf.validate_params(max_new_tokens=40, temperature=0, ignore_eos=True), logprobs=5)
        outs = []
        while not req.done:
            outs += engine.step()
        got.append([e for o in outs for e in o.logprobs])
    eager, graphs = got
    assert [e["token_id"] for e in eager] == [e["token_id"] for e in graphs]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(eager, graphs))


@pytest.mark.parametrize("name", [name for name, (dtype, _) in SAMPLERS.items() if dtype == torch.float32])
def test_graphs_equal_eager_fp32(name):
    """Bucketed, captured and pipelined against exact shapes, uncaptured and read every step."""
    model = gpt2_124m(torch.float32)
    sampling = SAMPLERS[name][1]
    eager, _ = run(model, PROMPTS, graphs=False, pipeline=False, decode_chunk=1)(max_new_tokens=100, **sampling)
    graphs, _ = run(model, PROMPTS, graphs=True)(max_new_tokens=100, **sampling)
    assert graphs == eager


def test_compiled_graphs_equal_eager_fp32():
    model = gpt2_124m(torch.float32)
    eager, _ = run(model, PROMPTS, graphs=False)(max_new_tokens=150)
    compiled, engine = run(model, PROMPTS, graphs=True, compile=True)(max_new_tokens=150)
    assert engine.runner.forward is not _call_model and not engine.notes, engine.notes  # compiled
    assert compiled == eager


def test_joining_mid_way_changes_nothing_in_graph_mode():
    """Rows join (prefilled in chunks) and leave at different steps of a pipelined graph engine.

    float64: alone (batch 1) and joined (batch 4) run GEMMs of other shapes, and cuBLAS rounds those
    differently; on random weights the distribution is nearly flat, so fp32 rounding alone can move a
    top-p / inverse-CDF boundary and flip a sampled token. A float64 model also samples in float64
    (in fp32 the cumulative sum over 50k ids alone moved a penalties row's token 23 on an H200).
    float64 keeps the check about scheduling."""
    model = gpt2_124m(torch.float64)
    samplers = [dict(temperature=0), SAMPLERS["topk-fp32"][1], SAMPLERS["penalties-fp32"][1]]
    jobs = [(PROMPTS[i % 4], dict(samplers[i % 3], max_new_tokens=n, ignore_eos=True))
            for i, n in enumerate([200, 5, 140, 30, 60, 90])]
    alone = [inf.generate_text(inf.Engine(model, max_batch=1, graphs=False), p, raw=True, **kw)["token_ids"]
             for p, kw in jobs]
    engine = inf.Engine(model, max_batch=4, prefill_chunk=16, graphs=True)
    reqs, got = [], {}
    join_at = {0: [0, 1], 3: [2], 4: [3], 9: [4, 5]}
    for step in range(1000):
        for i in join_at.get(step, []):
            reqs.append(engine.add(inf.encode_prompt(jobs[i][0], raw=True), inf.validate_params(**jobs[i][1])))
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
        if step > 9 and not engine.has_work():
            break
    assert [got[r.id] for r in reqs] == alone
    assert engine.stats()["slots_used"] == 0 and not engine.notes


def test_prefix_cache_on_equals_off_in_graph_mode():
    """Prompts sharing a long prefix, one after another and together, on a pipelined graph engine: the
    cache changes what is prefilled, not the tokens, logprobs or echoed prompt logprobs (float64, see above)."""
    model = gpt2_124m(torch.float64)
    base = inf.encode_prompt(" ".join(["word"] * 300), raw=True)
    prompts = [base, base[:200] + [11, 12, 13], base[:150], base]
    params = inf.validate_params(max_new_tokens=20, temperature=0.8, seed=1, ignore_eos=True)
    got = []
    for on in (True, False):
        engine, outs, index = inf.Engine(model, max_batch=4, graphs=True, prefix_cache=on), {}, {}

        def drain():
            while engine.has_work():
                for o in engine.step():
                    outs.setdefault(index[o.request_id], []).extend(
                        [o.token_ids, [round(e["logprob"], 9) for e in o.logprobs],
                         [round(x, 9) for x in o.prompt_logprobs.logprob] if o.prompt_logprobs else []])

        for together in (False, True):
            for i, ids in enumerate(prompts):
                index[engine.add(ids, params, logprobs=1, echo=True).id] = (together, i)
                if not together:
                    drain()
            drain()
        got.append(outs)
        assert engine.stats()["prefix_cache"]["hits"] >= 4 * on and not engine.notes
    assert got[0] == got[1]


def test_matches_transformers_greedy_fp32():
    transformers = pytest.importorskip("transformers")
    from model import GPT2_VOCAB, ours_to_hf

    model = gpt2_124m(torch.float32)
    cfg = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.load_state_dict(ours_to_hf(model.state_dict(), GPT2_VOCAB), strict=False)
    hf.tie_weights()
    hf = hf.eval().cuda()
    ids = inf.encode_prompt(PROMPTS[1], raw=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          pad_token_id=GPT2_VOCAB - 1)[0, len(ids):].tolist()
    ours, _ = run(model, [PROMPTS[1]], graphs=True)(max_new_tokens=64)
    assert ours[0] == ref


def test_load_model_defaults_on_cuda(tmp_path):
    from checkpoint import save_checkpoint

    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128)).eval()
    path = save_checkpoint(tmp_path / "ckpt.pt", kind="sft", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=1)
    loaded, info = inf.load_model_from_checkpoint(path)
    assert info["device"].startswith("cuda") and info["dtype"] == "bfloat16"
    engine = inf.Engine(loaded, max_batch=2)
    assert engine.runner.graphs.enabled and engine.pipeline and engine.runner.kmax == 8
    r = inf.generate_text(engine, "Say hi", max_new_tokens=20, seed=0)
    assert r["completion_tokens"] >= 1
    assert len(embed_all(engine, [[1, 2, 3]])[0]) == 128


def test_warmup_captures_up_front():
    model = gpt2_124m(torch.bfloat16)
    engine = inf.Engine(model, max_batch=4)
    n = engine.warmup()
    # batch buckets 1, 2, 4 x cache lengths 128 .. 1024 x (2 kinds + the constrained forward), and the masked
    # sampler of the 2 kinds per batch bucket; the prefill buckets (tokens, rows 1, 2, 4, longest row) a step
    # can make: 39
    prefill = engine.runner.prefill_graphs.graphs
    assert n == 3 * 8 * 3 + 3 * 2 + 39 and len(prefill) == 39 and not engine.notes
    inf.generate_batch(engine, PROMPTS[:3], max_new_tokens=100, temperature=0.8, seed=1, raw=True, ignore_eos=True)
    inf.generate_batch(engine, PROMPTS[:2], max_new_tokens=100, temperature=0, raw=True, ignore_eos=True)
    assert len(engine.runner.graphs.graphs) + len(prefill) == n  # nothing new to capture


def test_constrained_graphs_equal_eager_fp32():
    """The two halves of a constrained step (forward graph, masked sampler graph) against eager steps, with
    unconstrained requests in the same batch."""
    model = gpt2_124m(torch.float32)
    c = make_constraint("json_schema", {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "string", "maxLength": 8}}}}, "x")
    got = []
    for engine in (inf.Engine(model, max_batch=8, graphs=False, pipeline=False, decode_chunk=1),
                   inf.Engine(model, max_batch=8, graphs=True)):
        free = inf.validate_params(max_new_tokens=60, temperature=0.9, seed=2, raw=True, ignore_eos=True)
        reqs = [engine.add(inf.encode_prompt(p, raw=True), free.replace(constraint=c if i % 2 else None), n=2)
                for i, p in enumerate(PROMPTS)]
        outs = {}
        while not all(r.done for r in reqs):
            for o in engine.step():
                outs.setdefault((o.request_id, o.index), []).extend(o.token_ids)
        got.append([outs[(r.id, i)] for r in reqs for i in range(2)])
    assert got[0] == got[1]


def test_steps_never_wait_for_the_device_but_to_read_results():
    """Admissions mid-stream, first tokens (echo and logprobs, penalties and logit bias, n > 1, a grammar),
    prefix-cache hits and decode chunks only queue work: under torch's sync debug mode any hidden host-device
    sync (an item assignment from the host, a copy from pageable memory, .item()) raises. Results are read
    through Fetch's event, which the mode does not count."""
    model = gpt2_124m(torch.bfloat16)
    engine = inf.Engine(model, max_batch=8)
    c = make_constraint("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}}, "x")
    kinds = [(dict(temperature=0), dict(logprobs=2, echo=True)), (dict(temperature=0.8, top_k=50, seed=1), dict(n=2)),
             (dict(temperature=0.9, presence_penalty=0.5, logit_bias={262: 2.0}, seed=2), {}),
             (dict(temperature=0.7, seed=3, constraint=c), {})]

    def run_round(prefix):
        reqs = []
        for step in range(200):
            if step in (0, 3, 6):  # a third joins running rows; the shared prefix hits the cache from round 2 on
                for p, extra in kinds:
                    params = inf.validate_params(max_new_tokens=12, raw=True, ignore_eos=True, **p)
                    reqs.append(engine.add(inf.encode_prompt(prefix + f" {step}", raw=True), params, **extra))
            engine.step()
            if step > 6 and not engine.has_work():
                break
        assert all(r.done for r in reqs)

    for _ in range(2):  # captures the graphs these kinds use, without and with cache hits (a capture synchronizes)
        run_round(" ".join(["word"] * 40))
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_round(" ".join(["word"] * 40))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert engine.stats()["prefix_cache"]["hits"] > 0 and not engine.runner.graphs.notes


def upload(values, dtype):
    return torch.tensor(values, dtype=dtype, device="cuda")


def test_packed_prefill_flash_aligns_each_row_bottom_right():
    """FlashAttention's variable-length kernel (half precision on CUDA) attends as the row-by-row masked path:
    new rows and rows continuing a cached prefix (fewer queries than keys), each reading its own cache slot."""
    torch.manual_seed(0)
    H, D, block, rows = 4, 64, 128, [(0, 0, 5), (2, 33, 7), (3, 16, 1), (1, 0, 33), (5, 84, 16)]  # (slot, start, n)
    q = torch.randn(sum(n for *_, n in rows), H, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(6, block, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    _, p = pack([([0] * n, slot, s) for slot, s, n in rows], block, upload)
    flash, by_rows = varlen_causal(q, kc, vc, p), varlen_causal(q.float(), kc.float(), vc.float(), p)  # float32: by rows
    assert (flash.float() - by_rows).abs().max() < 3e-2


def test_prefill_graphs_equal_the_uncaptured_forward():
    """A packed prefill replayed from a CUDA graph (padded to its bucket: extra tokens write to the spare slot,
    extra rows are empty) gives the uncaptured forward's hidden states and cache, to bf16's rounding, for new
    rows and rows continuing a prefix; the capture and a replay alike. The slots no chunk names stay as they were."""
    model = gpt2_124m(torch.bfloat16)
    runner = inf.Engine(model, max_batch=8).runner
    ids = lambda n, seed: torch.randint(1000, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    idx, packed = pack([(ids(40, 1), 1, 0), (ids(100, 2), 3, 0)], 1024, upload)
    model.hidden(idx, cache=runner.cache, packed=packed)  # the prefixes rows 1 and 3 continue
    chunks = [(ids(5, 3), 0, 0), (ids(7, 4), 1, 40), (ids(1, 5), 3, 100), (ids(33, 6), 5, 0)]
    before = [t.clone() for t in runner.cache.k]
    idx, packed = pack(chunks, 1024, upload)
    want = model.hidden(idx, cache=runner.cache, packed=packed)[0]
    for _ in range(2):
        got = runner.prefill_graphs.run(chunks)
        assert got.shape == want.shape and (got.float() - want.float()).abs().max() < 5e-2
    assert len(runner.prefill_graphs.graphs) == 1 and not runner.graphs.notes
    for layer, old in zip(runner.cache.k, before):
        assert torch.equal(layer[[2, 4, 6, 7]], old[[2, 4, 6, 7]])
