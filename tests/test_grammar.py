"""grammar.py: the request-form table, and decoding under constraints from a random-weights GPT.

A random model is the hard case: nothing but the grammar keeps its output valid. The loop below is a
plain batched sampler (temperature 1.0, one row per sample, a KV cache of its own) so the tests exercise the
constraint alone: fill the rows of the live samples, mask their logits, sample, advance.
"""

import importlib.util
import json
import multiprocessing
import os
import random
import re
import threading

import jsonschema
import pytest
import torch

import grammar
import inference
from checkpoint import save_checkpoint
from common import run_cli
from engine.sampling_params import SamplingParams
from grammar import (ConstraintError, Matcher, apply_bitmask, compile_constraint, constraint_from_request,
                     fill_bitmask, make_constraint, new_bitmask)
from tokenizer import EOT_ID, N_VOCAB, decode
from conftest import ROOT, tiny_config
from model import GPT, KVCache
from server.engine_worker import Add, Cancel, Step, Stop, engine_loop

SCHEMAS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "json_schemas.json")))
SAMPLES = 50
MAX_NEW = 200  # no sample of these bounded specs comes near it; hitting it fails the test


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # vocabulary-wide ops on 50 rows: one thread is as fast, and spares a shared machine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=256, n_layer=1, n_head=2, n_embd=16)).eval().requires_grad_(False)


@torch.no_grad()
def decode_constrained(model, constraint, n=SAMPLES, seed=0, must_end=True, max_new=MAX_NEW):
    """n samples at temperature 1.0 under the constraint, one row each; returns the texts of those that
    ended (EOS excluded). Only the live rows are masked and sampled (a finished row is fed end-of-text)."""
    matchers = [Matcher(compile_constraint(constraint)) for _ in range(n)]
    cache = KVCache(model.config, n)
    tokens = torch.full((n,), EOT_ID, dtype=torch.long)  # end-of-text as the start token
    live, out, bitmask = list(range(n)), [[] for _ in range(n)], new_bitmask(n)
    gen = torch.Generator().manual_seed(seed)
    for step in range(max_new):
        if not live:
            break
        h = model.hidden(tokens.view(n, 1), cache=cache, pos=torch.full((n,), step), kv_len=step + 1)
        rows = torch.tensor(live)
        logits = model.lm_head(h[rows, -1]).float()  # (live, 50304)
        fill_bitmask([matchers[i] for i in live], bitmask)
        logits = apply_bitmask(logits, bitmask[:len(live)])
        cum = torch.softmax(logits, -1).cumsum(-1)  # inverse CDF: far cheaper than torch.multinomial here
        u = torch.rand(len(live), 1, generator=gen) * cum[:, -1:]
        picked = torch.searchsorted(cum, u, right=True).view(-1)  # u < total: a token with probability
        tokens = torch.full((n,), EOT_ID).index_copy_(0, rows, picked)
        for i in list(live):
            t = tokens[i].item()
            assert t < N_VOCAB, "a padding id was sampled"
            assert matchers[i].accept(t), decode(out[i] + [t])
            if t == EOT_ID:
                assert matchers[i].done
                live.remove(i)
            else:
                out[i].append(t)
    assert not (live and must_end), f"{len(live)} samples still open after {max_new} tokens"
    return [decode(o) for i, o in enumerate(out) if i not in live]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_samples_validate(model, name):
    schema = SCHEMAS[name]
    texts = decode_constrained(model, make_constraint("json_schema", schema, "guided_json"))
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) >= 5, "temperature 1.0 should give varied outputs"


def test_json_object_samples_parse(model):
    """Any object: unbounded, so a random model may still be writing at the limit (a trained one stops);
    what ended parses, what did not is still a valid prefix (the matchers accepted every token)."""
    c = make_constraint("json_object", True, "response_format")
    for text in decode_constrained(model, c, n=8, must_end=False, max_new=64):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("regex", [r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}", r"\+?[0-9]{1,3}-[0-9]{3}-[0-9]{4}",
                                   r"(yes|no)(, because [a-z ]{1,20})?"])
def test_regex_samples_match(model, regex):
    for text in decode_constrained(model, make_constraint("regex", regex, "guided_regex")):
        assert re.fullmatch(regex, text), text


def test_choice_samples_are_choices(model):
    choices = ["yes", "no", "maybe later", "Positive sentiment", "{\"quoted\": true}"]
    texts = decode_constrained(model, make_constraint("choice", choices, "guided_choice"))
    assert set(texts) <= set(choices) and len(set(texts)) > 1


@pytest.mark.parametrize("text", ['root ::= term (" + " term){0,3}\nterm ::= [0-9]{1,3} | "(" [a-z]{1,4} ")"',
                                  'start: term (" + " term)~0..3\nterm: /[0-9]{1,3}/ | "(" /[a-z]{1,4}/ ")"'])
def test_grammar_samples_parse(model, text):  # GBNF, then the same grammar in Lark
    term = r"([0-9]{1,3}|\([a-z]{1,4}\))"
    for out in decode_constrained(model, make_constraint("grammar", text, "guided_grammar")):
        assert re.fullmatch(rf"{term}( \+ {term}){{0,3}}", out), out


def test_matchers_of_one_template_are_independent():  # as the n choices of a request
    c = make_constraint("choice", ["alpha", "beta"], "guided_choice")
    a, b = Matcher(compile_constraint(c)), Matcher(compile_constraint(c))
    bitmask = new_bitmask(2)
    for t in grammar.get_tokenizer().encode_ordinary("alpha"):
        assert a.accept(t)
    fill_bitmask([a, b], bitmask)
    assert a.done and not b.done
    assert allowed(bitmask[0]) == [EOT_ID] and EOT_ID not in allowed(bitmask[1])
    assert not a.accept(decode_id("beta"))  # a refused token leaves the matcher in error
    fill_bitmask([a], bitmask)
    assert allowed(bitmask[0]) == [EOT_ID]  # in error: end-of-text only, never an empty row


def decode_id(text):
    return grammar.get_tokenizer().encode_ordinary(text)[0]


def allowed(row):
    return ((row.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten().nonzero().flatten().tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_fill_writes_its_rows_and_apply_masks_a_copy(device):
    c = make_constraint("regex", "[0-9]+", "guided_regex")
    bitmask = new_bitmask(3)
    bitmask[1] = -1  # a row no matcher is given stays as it was: all ones, nothing masked
    fill_bitmask([Matcher(compile_constraint(c)), Matcher(compile_constraint(c))], bitmask, rows=[2, 0])
    assert bitmask[1].eq(-1).all() and torch.equal(bitmask[0], bitmask[2])
    logits = torch.randn(3, grammar.PADDED_VOCAB, device=device)
    before = logits.clone()
    masked = apply_bitmask(logits, bitmask.to(device))
    assert torch.equal(logits, before) and torch.equal(masked[1], before[1])  # raw logits kept; all ones: as is
    for row in (0, 2):
        kept = (masked[row] > float("-inf")).nonzero().flatten().cpu().tolist()
        assert kept == allowed(bitmask[0]) and max(kept) < N_VOCAB
        assert all(decode([t]).isdigit() for t in kept)
        assert torch.equal(masked[row, kept], before[row, kept])
    assert torch.equal(apply_bitmask(before[:, :N_VOCAB], bitmask.to(device)), masked[:, :N_VOCAB])


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
FORM_CASES = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}}},
     "json_schema", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     "json_schema", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}}, "json_object", "response_format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}}, "json_schema",
     "text.format.schema"),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", "structured_outputs.json"),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema", "structured_outputs.json"),
    ({"structured_outputs": {"json_object": True}}, "json_object", "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", "structured_outputs.grammar"),
    ({"guided_json": SCHEMA}, "json_schema", "guided_json"),
    ({"guided_regex": "[a-z]+"}, "regex", "guided_regex"),
    ({"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", "guided_grammar"),
]


@pytest.mark.parametrize("body,kind,field", FORM_CASES)
def test_request_forms(body, kind, field):
    c = constraint_from_request(body)
    assert (c.kind, c.field) == (kind, field)
    compile_constraint(c)


def test_request_forms_canonical_and_absent():
    a = constraint_from_request({"guided_json": {"type": "object", "required": ["a"]}})
    b = constraint_from_request({"structured_outputs": {"json": '{"required": ["a"],  "type": "object"}'}})
    assert a.spec == b.spec  # one cache entry for the same schema, however it was written
    for body in ({}, {"response_format": {"type": "text"}}, {"structured_outputs": {"json_object": False}},
                 {"guided_json": None}, {"text": {"format": {"type": "text"}}}):
        assert constraint_from_request(body) is None


@pytest.mark.parametrize("body,field,words", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "must be one of"),
    ({"response_format": {}}, "response_format.type", "required"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "not both"),
    ({"guided_json": "{bad"}, "guided_json", "not valid JSON"),
    ({"guided_json": [1]}, "guided_json", "must be an object or a string"),
    ({"guided_choice": []}, "guided_choice", "non-empty array of strings"),
    ({"guided_choice": ["a", 1]}, "guided_choice", "non-empty array of strings"),
    ({"guided_regex": 5}, "guided_regex", "must be a string"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": "x"}, "structured_outputs", "must be an object"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "Expected ')'"),
    ({"guided_json": {"type": "integr"}}, "guided_json", "integr"),
    ({"guided_json": {"type": "integer", "minimum": 9, "maximum": 1}}, "guided_json", "Unsatisfiable"),
])
def test_request_form_errors_name_the_field(body, field, words):
    with pytest.raises(ConstraintError) as e:
        compile_constraint(constraint_from_request(body))
    assert e.value.field == field and words in str(e.value) and str(e.value).startswith(field + ": ")


def nested(depth):
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


HOSTILE = [  # (kind, spec): each gets a ConstraintError, or compiles within the fuel bound
    ("json_schema", nested(30)),  # deep but within MAX_DEPTH: compiles
    ("json_schema", nested(100)),  # past MAX_DEPTH
    ("json_schema", {"enum": [f"value{i}" for i in range(10_000)]}),  # huge enum within the size bound
    ("json_schema", {"enum": [f"value{i}" for i in range(100_000)]}),  # past MAX_SPEC_CHARS
    ("json_schema", {"allOf": [{"type": "string"}, {"type": "integer"}]}),
    ("json_schema", {"type": "string", "minLength": 5, "maxLength": 2}),
    ("json_schema", {"type": "array", "minItems": 3, "maxItems": 1}),
    ("json_schema", {"$ref": "#/$defs/missing"}),
    ("json_schema", {"type": "string", "pattern": "(a{1,1000}){1,1000}"}),
    ("json_schema", {"properties": {"a": {"$ref": "#"}}, "required": ["a"], "type": "object"}),  # no finite output
    ("json_schema", {"type": 5}),
    ("regex", "(a{1,1000}){1,1000}"),
    ("regex", "[a-"),
    ("regex", "a{99999999}"),
    ("regex", "((((a{1,100}){1,100}){1,100}){1,100})"),
    ("regex", "\\"),
    ("grammar", "root ::= r0\n" + "".join(f'r{i} ::= "x" r{i + 1} | "y"\n' for i in range(2000)) + 'r2000 ::= "z"\n'),
    ("grammar", "start: r0\n" + "".join(f'r{i}: "x" r{i + 1} | "y"\n' for i in range(3000)) + 'r3000: "z"\n'),
    ("grammar", "root ::= root"),
    ("grammar", "start: undefined_rule"),
    ("grammar", "%%%"),
    ("choice", ["x" * 100_000, "y"]),
    ("choice", [""]),
]


def compile_or_error(kind, spec):
    """A ConstraintError, or a template whose first mask is not empty; any other exception fails."""
    try:
        template = compile_constraint(make_constraint(kind, spec, "guided_" + kind))
    except ConstraintError as e:
        assert str(e).startswith("guided_") and len(str(e).splitlines()) == 1
        return "error"
    bitmask = new_bitmask(1)
    fill_bitmask([Matcher(template)], bitmask)
    assert allowed(bitmask[0])
    return "compiled"


@pytest.mark.parametrize("kind,spec", HOSTILE, ids=[f"{k}{i}" for i, (k, _) in enumerate(HOSTILE)])
def test_hostile_specs_are_bounded(kind, spec):
    compile_or_error(kind, spec)


def test_hostile_bounds_are_errors_naming_the_bound():
    with pytest.raises(ConstraintError, match="nested deeper than 64"):
        make_constraint("json_schema", nested(100), "guided_json")
    for kind, spec in [("regex", "a{99999999}"), ("json_schema", {"type": "string", "pattern": "^a{20001}$"}),
                       ("grammar", 'start: "a"~99999'), ("grammar", 'root ::= "a"{0,123456}')]:
        with pytest.raises(ConstraintError, match="over the limit of 10000"):
            make_constraint(kind, spec, "guided_" + kind)
    grammar.COMPILE_TIMEOUT = 0  # a spec that takes ~0.5 s (it finishes in the background after the error)
    chain = "start: r0\n" + "".join(f'r{i}: "q" r{i + 1} | "w"\n' for i in range(3000)) + 'r3000: "e"\n'
    try:
        with pytest.raises(ConstraintError, match="took over 0 s to compile"):
            compile_constraint(make_constraint("grammar", chain, "guided_grammar"))
    finally:
        grammar.COMPILE_TIMEOUT = 10
    for kind, spec in [("choice", ["x" * 20_000]), ("regex", "x" * 20_000), ("grammar", f'start: "{"x" * 9000}"'),
                       ("json_schema", {"const": "x" * 9000})]:  # a mask inside costs the literal's length squared
        with pytest.raises(ConstraintError, match="a literal of .* over the limit of 5000"):
            make_constraint(kind, spec, "guided_" + kind)
    with pytest.raises(ConstraintError, match="too large"):
        make_constraint("json_schema", {"enum": [f"value{i}" for i in range(100_000)]}, "guided_json")


def test_fuzz_malformed_schemas():
    """Schemas mangled at random (characters dropped, values swapped): an error or a grammar, never a crash."""
    rng, texts = random.Random(0), [json.dumps(s) for s in SCHEMAS.values()]
    junk = ['"x"', "-1", "null", "[]", "{}", "1e999", '"^("', "true", '{"type": "nope"}', '"\\u0000"']
    outcomes = []
    for _ in range(150):
        text = list(rng.choice(texts))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            if rng.random() < 0.5:
                del text[i:i + rng.randint(1, 3)]
            else:
                text[i:i] = rng.choice(junk)
        outcomes.append(compile_or_error("json_schema", "".join(text)))
    assert "error" in outcomes and "compiled" in outcomes


# ---------------------------------------------------------------------- the engine under constraints

MODES = {"eager": dict(), "pipelined": dict(static=True, decode_chunk=3, pipeline=True)}


def constrained(kind, spec, **params):
    p = SamplingParams.make(dict(dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, seed=1, raw=True), **params))
    return p.replace(constraint=make_constraint(kind, spec, "guided_" + kind))


def run(engine, requests):
    """Step until the requests are done -> {(request id, choice): [token ids, text, finish reason, logprobs]}."""
    got = {}
    while not all(r.done for r in requests):
        for o in engine.step():
            c = got.setdefault((o.request_id, o.index), [[], "", None, []])
            c[0] += o.token_ids
            c[1] += o.text
            c[2] = o.finish_reason or c[2]
            c[3] += o.logprobs or []
    return got


@pytest.mark.parametrize("mode", list(MODES))
def test_engine_choices_validate_and_a_batch_changes_nothing(model, mode):
    """n choices of a schema through the engine; alone, or batched with unconstrained requests (same tokens
    for both: the constrained one's mask never touches the others, and theirs never changes it)."""
    schema = SCHEMAS["any_of"]
    p = constrained("json_schema", schema)
    free = SamplingParams.make(max_new_tokens=30, temperature=1.0, seed=5, raw=True, ignore_eos=True)
    prompt, other = decode_ids("Once upon"), decode_ids("x y z")
    alone, batch = (inference.Engine(model, max_batch=8, **MODES[mode]) for _ in range(2))
    a = run(alone, [alone.add(prompt, p, n=4, request_id=7)])
    b_free = alone.add(other, free)
    b_free_alone = run(alone, [b_free])[(b_free.id, 0)][0]
    reqs = [batch.add(other, free), batch.add(prompt, p, n=4, request_id=7), batch.add(other, free)]
    b = run(batch, reqs)
    for i in range(4):
        ids, text, reason, _ = a[(reqs[1].id, i)]
        jsonschema.validate(json.loads(text), schema)
        assert reason == "stop" and EOT_ID not in ids  # the grammar completed: the choice ends there
        assert b[(reqs[1].id, i)][0] == ids
    assert len({a[(reqs[1].id, i)][1] for i in range(4)}) > 1  # each choice its own matcher and seed
    assert b[(reqs[0].id, 0)][0] == b[(reqs[2].id, 0)][0] == b_free_alone


def decode_ids(text):
    return grammar.get_tokenizer().encode_ordinary(text)


def test_engine_stop_logprobs_stream_and_cancel(model):
    engine = inference.Engine(model, max_batch=4)
    p = constrained("choice", ["hello world", "hello there"], stop=[" "])
    r = engine.add(decode_ids("Hi"), p, n=2, logprobs=2)
    got = run(engine, [r])
    for i in range(2):
        ids, text, reason, lps = got[(r.id, i)]
        assert (text, reason) == ("hello", "stop") and len(lps) == len(ids)
        assert all(e["logprob"] <= 0 and len(e["top"]) == 2 for e in lps)  # raw: the mask does not touch them
    p = constrained("regex", "[a-z]{3}-[0-9]{2}", seed=3)
    pieces = list(inference.stream_text(model, "Hi", **{k: getattr(p, k) for k in ("seed", "raw", "constraint")},
                                        temperature=1.0, top_k=0, max_new_tokens=MAX_NEW))
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", "".join(pieces))
    assert "".join(pieces) == inference.generate_text(model, "Hi", seed=3, raw=True, temperature=1.0, top_k=0,
                                                      max_new_tokens=MAX_NEW, constraint=p.constraint)["text"]
    r = engine.add(decode_ids("Hi"), constrained("json_object", True), n=2)
    engine.step()
    engine.step()
    engine.cancel(r)
    outs = run(engine, [r])
    assert {outs[(r.id, i)][2] for i in range(2)} == {"cancelled"} and engine.stats()["slots_used"] == 0


def slow_grammar(rules):
    """A Lark chain that takes ~0.5 s to compile on one core (a new rule count misses the cache)."""
    return "start: r0\n" + "".join(f'r{i}: "q" r{i + 1} | "w"\n' for i in range(rules)) + f'r{rules}: "e"\n'


def test_engine_process_steps_while_a_grammar_compiles(model):
    """The engine process compiles a new grammar off its loop: a running stream keeps stepping meanwhile,
    the constrained request joins once compiled, and one cancelled while compiling never starts."""
    server, child = multiprocessing.Pipe()
    loop = threading.Thread(target=engine_loop, args=(child, inference.Engine(model, max_batch=4)), daemon=True)
    loop.start()
    free = SamplingParams.make(max_new_tokens=150, temperature=1.0, seed=1, raw=True, ignore_eos=True)
    server.send(Add(1, decode_ids("Hi"), free, 1, None, False, 1))
    server.send(Add(2, decode_ids("Hi"), constrained("grammar", slow_grammar(3001), max_new_tokens=20), 1, None,
                    False, 2))
    server.send(Add(3, decode_ids("Hi"), constrained("grammar", slow_grammar(3002)), 1, None, False, 3))
    server.send(Cancel(3))
    free_steps, started, done = 0, False, set()  # the free stream's steps before request 2's first token
    while not done >= {1, 2}:
        assert server.poll(30), "the engine loop stopped answering"
        m = server.recv()
        assert isinstance(m, Step) and {o.request_id for o in m.outputs} <= {1, 2}
        started = started or any(o.request_id == 2 for o in m.outputs)
        free_steps += not started and any(o.request_id == 1 for o in m.outputs)
        done |= {o.request_id for o in m.outputs if o.finish_reason}
    assert free_steps >= 10
    server.send(Stop())
    loop.join(10)
    assert not loop.is_alive()


def test_cli_json_schema(tmp_path, model, capsys):
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), kind="sft", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=0)
    schema = SCHEMAS["enums"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    argv = ["--ckpt", ckpt, "--prompt", "Colour?", "--temperature", "1", "--seed", "2"]
    assert inference.main(argv + ["--json-schema", str(tmp_path / "s.json")]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    (tmp_path / "bad.json").write_text('{"type": "integer", "minimum": 5, "maximum": 1}')
    (tmp_path / "text.json").write_text("{oops")
    for name, words in [("missing.json", "No such file"), ("text.json", "not valid JSON"),
                        ("bad.json", "Unsatisfiable")]:
        with pytest.raises(SystemExit) as e:
            run_cli(inference.main, argv + ["--json-schema", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: --json-schema {tmp_path / name}: ") and words in err
        assert err.count("\n") == 1


def test_generate_bench_constrained_mode_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(ROOT, "bench", "generate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--device", "cpu", "--batch-sizes", "2", "--n-new", "8", "--no-hf", "--repeats",
                       "1", "--json-schema", "nested"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["impl"] for r in result["results"]} == {"ours", "ours+json", "ours+1json"}
    assert result["grammar"]["compile_ms"] > 0 and result["grammar"]["constrained_vs_free"]["eager/b2"] > 0
    assert result["grammar"]["one_constrained_vs_free"]["eager/b2"] > 0


def test_engine_chunked_prefill_beside_running_rows(model):
    """A constrained prompt prefilled 8 tokens a step while a free request decodes (and the reverse)."""
    engine = inference.Engine(model, max_batch=4, prefill_chunk=8, static=True, decode_chunk=4, pipeline=True)
    free = SamplingParams.make(max_new_tokens=40, temperature=1.0, seed=1, raw=True, ignore_eos=True)
    schema = SCHEMAS["nested_object"]
    first = engine.add(decode_ids("x"), free)  # prefilled in the first step, decoding while the others prefill
    long = decode_ids("a fairly long prompt that takes several prefill steps of eight tokens each " * 2)
    reqs = [first, engine.add(long, constrained("json_schema", schema), n=2), engine.add(long, free)]
    got = run(engine, reqs)
    for i in range(2):
        jsonschema.validate(json.loads(got[(reqs[1].id, i)][1]), schema)
    assert len(got[(reqs[0].id, 0)][0]) == len(got[(reqs[2].id, 0)][0]) == 40
