"""serve.py through Flask's test client, on a tiny random-weight checkpoint: every route, the one error
model (400 with param), hostile bodies, SSE framing, logprobs / echo / n / prompt arrays, headers."""

import base64
import json
import random
import struct

import pytest
import torch

import inference
import serve
from prompt import format_prompt
from server.app import build_app
from server.chat import fold_chat, split_chat
from server.engine_client import EngineClient
from test_grammar import HOSTILE, SCHEMAS
from test_serve_config import close_app, make_app, make_checkpoint, metric, sse_events
from tokenizer import N_VOCAB, decode, encode

CTX = 256  # block_size of the test model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_api"), block_size=CTX)


@pytest.fixture(scope="module")
def app(ckpt):
    app = make_app(ckpt, model_name="tiny")
    yield app
    close_app(app)


@pytest.fixture(scope="module")
def guarded(ckpt, tmp_path_factory):
    """API key, CORS for one origin, trusted proxy, small body and prompt limits, 3 requests a minute."""
    static = tmp_path_factory.mktemp("static")
    (static / "index.html").write_text("<!doctype html><title>chat</title>")
    (static / "app.js").write_text("console.log(1)")
    app = make_app(ckpt, api_key="sekrit", cors_origins=["http://page.example"], trust_proxy=1,
                   max_body_bytes=4096, max_prompt_tokens=64, rate_limit="3/minute", static_dir=str(static))
    yield app
    close_app(app)


def post(client, path, body, **kw):
    """A JSON POST; non-streamed replies are read and closed (as a WSGI server does) unless buffered=False."""
    kw.setdefault("buffered", not body.get("stream") if isinstance(body, dict) else True)
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


def error_of(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert set(err) == {"type", "message", "param", "code"} and err["message"]
    return err


def bad_field(client, path, body, param):
    """A 400 invalid_request_error whose param is `param` and whose message names it."""
    err = error_of(post(client, path, body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param.split("[")[0] in err["message"], err
    return err


def model_logprobs(app, ids):
    """log_softmax over the vocabulary of the model's own forward pass: row i predicts ids[i+1]."""
    model = inference.load_model_from_checkpoint(serve.state(app).config.ckpt)[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits[0, :-1, :N_VOCAB].float(), dim=-1)


AUTH = {"Authorization": "Bearer sekrit"}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
    "additionalProperties": False}}}]
CHAT = [{"role": "user", "content": "Say hi."}]

# ---------------------------------------------------------------------- health and loading


def test_health_is_503_while_loading_then_200(ckpt):
    server = EngineClient(serve.make_config({"ckpt": ckpt, "rate_limit": "none", "model_name": "m"}))
    client = build_app(server).test_client()  # not started yet: the model is "loading"
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json() == {"status": "loading"} and int(r.headers["Retry-After"]) > 0
    assert error_of(post(client, "/generate", {"prompt": "hi"}), 503)["type"] == "model_loading"
    assert client.get("/params").get_json()["context_length"] is None
    server.start()
    try:
        assert server.wait_ready(120)
        body = client.get("/health").get_json()
        assert body["status"] == "ok" and body["model"] == "m" and body["device"] == "cpu"
        assert body["context_length"] == CTX and body["dtype"] == "float32"
        assert body["queue"]["running"] == body["queue"]["waiting"] == body["queue"]["slots_used"] == 0
        assert body["queue"]["slots_total"] >= 1
    finally:
        server.close()


def test_a_failed_load_is_reported(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    app = serve.create_app({"ckpt": str(bad), "log_level": "error"})
    try:
        with pytest.raises(serve.UserError, match="model load failed"):
            serve.state(app).wait_ready(60)
        client = app.test_client()
        r = client.get("/health")
        assert r.status_code == 503 and r.get_json()["status"] == "error" and r.get_json()["error"]
        err = error_of(post(client, "/v1/chat/completions", {"messages": CHAT}), 503)
        assert err["type"] == "model_error"
    finally:
        close_app(app)


# ---------------------------------------------------------------------- /generate


def test_generate_plain_reply_matches_inference(app):
    client = app.test_client()
    req = {"prompt": "Write a word.", "max_new_tokens": 12, "seed": 123, "temperature": 0.9, "top_k": 40}
    r = post(client, "/generate", req, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42"
    body = r.get_json()
    assert body["finish_reason"] in ("eos", "stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(inference.encode_prompt("Write a word.")) and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert {"first_token_ms", "total_ms"} <= set(body["timings"])
    assert post(client, "/generate", req).get_json()["text"] == body["text"]  # seeded: reproducible
    model = inference.load_model_from_checkpoint(serve.state(app).config.ckpt)[0]
    direct = inference.generate_text(model, "Write a word.", max_new_tokens=12, seed=123,
                                     temperature=0.9, top_k=40)
    assert body["text"] == direct["text"]
    r = post(client, "/generate", {"prompt": "x", "max_new_tokens": 1}, headers={"X-Request-ID": "bad id <x>"})
    assert len(r.headers["X-Request-ID"]) == 32  # made up when the client's is malformed


def test_generate_context_raw_and_stream(app):
    client = app.test_client()
    body = post(client, "/generate", {"prompt": "Summarize.", "context": "Cats sleep.", "max_new_tokens": 2}).get_json()
    assert body["usage"]["prompt_tokens"] == len(inference.encode_prompt(format_prompt("Summarize.", "Cats sleep."), raw=True))
    body = post(client, "/generate", {"prompt": "Once upon a time", "raw": True, "max_new_tokens": 2}).get_json()
    assert body["usage"]["prompt_tokens"] == len(encode("Once upon a time"))
    bad_field(client, "/generate", {"prompt": "x", "context": "y", "raw": True}, "context")
    req = {"prompt": "Count to three.", "max_new_tokens": 10, "temperature": 0}
    plain = post(client, "/generate", req).get_json()
    r = post(client, "/generate", {**req, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
    *tokens, done = [json.loads(e) for e in sse_events(r.get_data(as_text=True))]
    assert all(set(e) == {"token"} for e in tokens) and "".join(e["token"] for e in tokens) == plain["text"]
    assert done["done"] is True and done["finish_reason"] == plain["finish_reason"] and done["usage"] == plain["usage"]


def test_generate_logprobs(app):
    client = app.test_client()
    req = {"prompt": "Hello", "raw": True, "max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    body = post(client, "/generate", req).get_json()
    lps = body["logprobs"]
    assert len(lps) == 4 and all(len(e["top_logprobs"]) == 3 for e in lps)
    assert "".join(e["token"] for e in lps) == body["text"]
    ids = encode("Hello") + [e["token_id"] for e in lps]
    ref = model_logprobs(app, ids)
    for i, e in enumerate(lps):  # raw log-probabilities of the model, greedy = the top alternative
        row = ref[len(encode("Hello")) - 1 + i]
        assert e["logprob"] == pytest.approx(row[e["token_id"]].item(), abs=1e-4)
        assert e["top_logprobs"][0]["token_id"] == e["token_id"]
    events = [json.loads(x) for x in sse_events(post(client, "/generate", {**req, "stream": True}).get_data(as_text=True))]
    streamed = [lp for e in events if "token" in e for lp in e["logprobs"]]
    assert [e["token_id"] for e in streamed] == [e["token_id"] for e in lps]


def test_generate_stop_string(app):
    client = app.test_client()
    req = {"prompt": "Go on.", "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = post(client, "/generate", req).get_json()["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    body = post(client, "/generate", {**req, "stop": [stop]}).get_json()
    assert body["finish_reason"] == "stop" and body["text"] == full[:full.index(stop)]


# ---------------------------------------------------------------------- the error model


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", "10"), ("max_new_tokens", 2.5), ("temperature", 2.5),
    ("temperature", "hot"), ("top_k", -1), ("top_p", 0), ("top_p", 1.5), ("min_p", 2),
    ("repetition_penalty", 0.5), ("presence_penalty", 3), ("frequency_penalty", -2.5), ("seed", -1),
    ("seed", 2 ** 64), ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}), ("logit_bias", [1]),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", 3), ("raw", "yes"), ("ignore_eos", 1),
    ("stream", "true"), ("prompt", 42), ("context", ["a"]), ("logprobs", 21), ("temprature", 0.5),
])
def test_generate_invalid_field_is_400_naming_it(app, field, value):
    err = bad_field(app.test_client(), "/generate", {"prompt": "hi", field: value}, field)
    spec = inference.PARAM_RANGES.get(field, {})
    for bound in ("min", "max"):  # the allowed range is in the message
        if isinstance(spec.get(bound), (int, float)) and not isinstance(spec.get(bound), bool):
            assert str(spec[bound]) in err["message"], err["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"max_new_tokens": 3}, "prompt"),
    ("/generate", {"prompt": "  "}, "prompt"),
    ("/v1/completions", {"max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": [1, 50257]}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [-1]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no user message
    ("/v1/chat/completions", {"messages": CHAT + [{"role": "tool", "content": "x", "id": 1}]}, "messages[1]"),
    ("/v1/chat/completions", {"messages": [*CHAT, {"role": "assistant", "tool_calls": [{"function": {}}]},
                                           {"role": "tool", "content": "x"}]}, "messages[1].tool_calls"),
    ("/v1/responses", {"input": "x", "store": True}, "store"),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/v1/responses", {"input": [1]}, "input"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
    ("/v1/responses", {"input": [{"type": "reasoning"}]}, "input[0].type"),
    ("/v1/responses", {"input": "x", "max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ("/tokenize", {"prompt": "x", "content": "x"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10 ** 6}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}], "tool_choice": "none"}, "tools[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS}, "tools"),  # auto: no tool parser
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "any"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                              "function": {"name": "f"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "g", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": CHAT, "guided_json": {"type": "integr"}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(ab"}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("/generate", {"prompt": "x", "guided_json": {"minimum": 3, "maximum": 1, "type": "integer"}}, "guided_json"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": False, "stream_options": {}}, "stream_options"),
    ("/v1/embeddings", {"input": [[1, 2], 3]}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens"),
    ("/tokenize", {}, "prompt"),
])
def test_openai_and_native_fields_share_one_error_model(app, path, body, param):
    bad_field(app.test_client(), path, body, param)


def test_max_tokens_is_named_as_the_client_sent_it(app):
    err = bad_field(app.test_client(), "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens")
    assert "max_new_tokens" not in err["message"]


@pytest.mark.parametrize("data", [
    b"{", b'{"prompt": "x",}', b"", b"[1, 2]", b'"text"', b'{"prompt": NaN}', b"\xff\xfe",
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than Python's recursion limit
    b'{"prompt": "x", "seed": 1' + b"0" * 400 + b"}", b'{"prompt": "x", "temperature": 1e309}',
    b'{"prompt": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
])
def test_hostile_bodies_are_400(app, data):
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        r = app.test_client().post(path, data=data, content_type="application/json")
        err = error_of(r, 400)
        assert err["type"] == "invalid_request_error"


def test_prompt_and_context_limits(app, guarded):
    client = app.test_client()
    bad_field(client, "/generate", {"prompt": "word " * 300, "raw": True}, "prompt")
    n = len(encode("word " * 150))
    err = bad_field(client, "/generate", {"prompt": "word " * 150, "raw": True, "max_new_tokens": 200}, "max_new_tokens")
    assert str(CTX - n) in err["message"]
    body = post(client, "/generate", {"prompt": "word " * 150, "raw": True, "ignore_eos": True}).get_json()
    assert body["usage"]["completion_tokens"] == min(inference.PARAM_RANGES["max_new_tokens"]["default"], CTX - n)
    err = error_of(post(guarded.test_client(), "/generate", {"prompt": "word " * 70, "raw": True}, headers=AUTH), 400)
    assert err["param"] == "prompt" and "64" in err["message"]  # --max-prompt-tokens


# ---------------------------------------------------------------------- other statuses, headers, hosts


def test_404_405_413_415_500_are_json(app, guarded, ckpt):
    client = app.test_client()
    assert error_of(client.get("/nope"), 404)["type"] == "not_found"
    assert error_of(client.post("/v2/anything", json={}), 404)["type"] == "not_found"
    r = client.get("/generate")
    assert error_of(r, 405)["type"] == "method_not_allowed" and "POST" in r.headers["Allow"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        r = client.post("/generate", data='{"prompt": "x"}', content_type=ctype)
        assert error_of(r, 415)["type"] == "unsupported_media_type"
    r = guarded.test_client().post("/generate", data=json.dumps({"prompt": "x" * 5000}),
                                   content_type="application/json", headers=AUTH)
    assert error_of(r, 413)["type"] == "request_too_large"
    server = EngineClient(serve.make_config({"ckpt": ckpt, "rate_limit": "none"}))
    broken = build_app(server)
    broken.add_url_rule("/boom", "boom", lambda: 1 / 0)
    err = error_of(broken.test_client().get("/boom", headers={"X-Request-ID": "r500"}), 500)
    assert err["type"] == "server_error" and "r500" in err["message"] and "division" not in err["message"]


def test_security_headers_and_allowed_hosts(app, guarded):
    client = app.test_client()
    for r in (client.get("/"), client.get("/health"), client.get("/nope"), post(client, "/generate", {})):
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
    for host in ("localhost:5000", "127.0.0.1", "[::1]:80"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:5000", "localhost.evil.example"):
        err = error_of(client.get("/health", headers={"Host": host}), 400)
        assert err["code"] == "invalid_host", host
    assert error_of(post(client, "/generate", {"prompt": "x"}, headers={"Host": "rebind.example"}), 400)


def test_api_key(guarded):
    client = guarded.test_client()
    req = {"prompt": "hi", "max_new_tokens": 1}
    ip = {"REMOTE_ADDR": "10.9.0.1"}
    r = post(client, "/generate", req, environ_base=ip)
    assert error_of(r, 401)["type"] == "authentication_error" and r.headers["WWW-Authenticate"] == "Bearer"
    error_of(post(client, "/generate", req, headers={"Authorization": "Bearer wrong"}, environ_base=ip), 401)
    error_of(client.get("/v1/models"), 401)
    error_of(client.get("/metrics"), 401)
    assert post(client, "/generate", req, headers=AUTH, environ_base=ip).status_code == 200
    for open_path in ("/health", "/params", "/openapi.json", "/", "/app.js"):
        assert client.get(open_path).status_code == 200, open_path


def test_cors(app, guarded):
    assert "Access-Control-Allow-Origin" not in app.test_client().get(
        "/health", headers={"Origin": "http://page.example"}).headers
    client = guarded.test_client()
    r = client.get("/health", headers={"Origin": "http://page.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://page.example"
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "http://evil.example"}).headers


def test_rate_limit_429_shared_by_generation_routes(ckpt):
    app = make_app(ckpt, rate_limit="3/minute")
    try:
        client = app.test_client()
        ip = {"REMOTE_ADDR": "10.1.0.1"}
        bodies = [("/generate", {"prompt": "a", "max_new_tokens": 1}),
                  ("/v1/completions", {"prompt": "a", "max_tokens": 1}),
                  ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})]
        for i, (path, body) in enumerate(bodies):
            r = post(client, path, body, environ_base=ip)
            assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == str(2 - i)
            assert "Retry-After" not in r.headers
        r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, environ_base=ip)
        assert error_of(r, 429)["type"] == "rate_limit_exceeded" and 0 < int(r.headers["Retry-After"]) <= 60
        for path in ("/health", "/params", "/metrics", "/v1/models", "/"):
            assert client.get(path, environ_base=ip).status_code == 200, path
        assert post(client, "/generate", {"prompt": "a", "max_new_tokens": 1},
                    environ_base={"REMOTE_ADDR": "10.1.0.2"}).status_code == 200
    finally:
        close_app(app)


def test_queue_full_is_503_with_retry_after(ckpt):
    app = make_app(ckpt, max_queue=1)
    try:
        client = app.test_client()
        held = post(client, "/generate", {"prompt": "x", "max_new_tokens": 2, "stream": True})
        assert held.status_code == 200  # its stream is not read yet: it holds the only place
        r = post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert error_of(r, 503)["type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert client.get("/health").get_json()["queue"]["admitted"] == 1
        held.close()
        assert client.get("/health").get_json()["queue"]["admitted"] == 0
        assert post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        close_app(app)


# ---------------------------------------------------------------------- OpenAI completions


def test_completions_shape_and_stream(app):
    client = app.test_client()
    body = post(client, "/v1/completions", {"model": "whatever", "prompt": "The sky is", "max_tokens": 5}).get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == len(encode("The sky is"))  # raw by default
    assert post(client, "/v1/completions", {"prompt": "a b", "raw": False, "max_tokens": 1}).get_json()[
        "usage"]["prompt_tokens"] == len(inference.encode_prompt("a b"))
    assert post(client, "/v1/completions", {"prompt": "a b", "ignore_eos": True}).get_json()[
        "usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    req = {"prompt": "One two", "max_tokens": 6, "temperature": 0}
    plain = post(client, "/v1/completions", req).get_json()
    r = post(client, "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    *chunks, usage = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_completion_logprobs_and_echo_match_the_model(app):
    client = app.test_client()
    prompt = "The quick brown fox"
    ids = encode(prompt)
    body = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}).get_json()
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and lp["tokens"] == [decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len(decode(ids[:i])) for i in range(len(ids))]
    ref = model_logprobs(app, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = lp["top_logprobs"][i]  # the token's own entry first, then up to 2 alternatives (as vLLM)
        assert len(top) <= 3 and next(iter(top.items())) == (lp["tokens"][i], lp["token_logprobs"][i])
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # echo with new tokens: prompt then completion, streamed the same as not
    req = {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}
    plain = post(client, "/v1/completions", req)
    full = plain.get_json()["choices"][0]
    assert full["text"].startswith(prompt) and len(full["logprobs"]["tokens"]) == len(ids) + 3
    events = sse_events(post(client, "/v1/completions", {**req, "stream": True}).get_data(as_text=True))
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == full["logprobs"]["tokens"]
    assert sum((c["logprobs"]["text_offset"] for c in chunks), []) == full["logprobs"]["text_offset"]


def test_completion_logprobs_0_gives_the_sampled_token_alone(app):
    body = post(app.test_client(), "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "logprobs": 0,
                                                       "temperature": 1.0, "seed": 3}).get_json()
    lp = body["choices"][0]["logprobs"]
    assert [list(top.items()) for top in lp["top_logprobs"]] == [[x] for x in zip(lp["tokens"], lp["token_logprobs"])]


def test_n_choices_and_prompt_forms(app):
    client = app.test_client()
    greedy = post(client, "/v1/completions", {"prompt": "Hi", "n": 3, "max_tokens": 5, "temperature": 0}).get_json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in greedy["choices"]}) == 1
    req = {"prompt": "Hi", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    sampled = post(client, "/v1/completions", req).get_json()
    texts = [c["text"] for c in sampled["choices"]]
    assert len(set(texts)) > 1 and [c["text"] for c in post(client, "/v1/completions", req).get_json()["choices"]] == texts
    assert sampled["usage"]["completion_tokens"] == 24
    # a token-id prompt equals its text; lists give one choice per prompt, in order
    by_text = post(client, "/v1/completions", {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}).get_json()
    by_ids = post(client, "/v1/completions", {"prompt": encode("Hello there"), "max_tokens": 4,
                                              "temperature": 0}).get_json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    many = post(client, "/v1/completions", {"prompt": ["Hello there", "Bye"], "n": 2, "max_tokens": 4,
                                            "temperature": 0}).get_json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == by_text["choices"][0]["text"] == many["choices"][1]["text"]
    ids = post(client, "/v1/completions", {"prompt": [encode("Hello there"), encode("Bye")], "max_tokens": 4,
                                           "temperature": 0}).get_json()
    assert [c["text"] for c in ids["choices"]] == [many["choices"][0]["text"], many["choices"][2]["text"]]
    assert ids["usage"]["prompt_tokens"] == len(encode("Hello there")) + len(encode("Bye"))


# ---------------------------------------------------------------------- OpenAI chat


def test_chat_completion_shape_and_stream(app):
    client = app.test_client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    req = {"model": "tiny", "messages": msgs, "max_tokens": 6, "temperature": 0}
    body = post(client, "/v1/chat/completions", req).get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    folded = format_prompt("Bye", "Be brief.\n\nUser: Hi\nAssistant: Hello.")
    assert body["usage"]["prompt_tokens"] == len(inference.encode_prompt(folded, raw=True))
    events = sse_events(post(client, "/v1/chat/completions", {**req, "stream": True}).get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_logprobs_and_n(app):
    client = app.test_client()
    req = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3, "n": 2,
           "ignore_eos": True}
    # first, so that the two requests compared below both reuse its cached prefix: in float32 a prefix
    # prefilled in another chunk shape may differ in the last bits (exactness is tested in float64)
    assert post(client, "/v1/chat/completions", {**req, "logprobs": False, "top_logprobs": None}).get_json()[
        "choices"][0]["logprobs"] is None
    body = post(client, "/v1/chat/completions", req).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 3
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"] and e["logprob"] <= 0
    events = sse_events(post(client, "/v1/chat/completions", {**req, "stream": True}).get_data(as_text=True))
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    streamed = [x for c in chunks if c["index"] == 0 and c["logprobs"] for x in c["logprobs"]["content"]]
    assert streamed == content


def test_chat_folding_keeps_recent_turns(app):
    assert split_chat([
        {"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "U2"},
    ]) == ("S1\n\nS2", [("user", "U1"), ("assistant", "A1")], "U2")
    msgs = [{"role": "system", "content": "SYSTEM"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn{i} " + "blah " * 30} for i in range(12)]
    body = post(app.test_client(), "/v1/chat/completions", {"messages": msgs + [{"role": "user", "content": "LAST"}],
                                                            "max_tokens": 1}).get_json()
    assert body["usage"]["prompt_tokens"] <= CTX - 1
    ids = fold_chat(msgs + [{"role": "user", "content": "LAST"}], lambda n: n <= CTX - 1)
    text = decode(ids)
    assert "SYSTEM" in text and "LAST" in text and "turn11" in text and "turn0 " not in text
    assert len(ids) == body["usage"]["prompt_tokens"]


def test_tool_calls_and_results_go_into_the_prompt(app):
    calls = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "-3C"}]
    assert split_chat(msgs) == ("S", [("assistant", '{"name": "weather", "arguments": {"city": "Oslo"}}'),
                                      ("tool", "-3C")], "Weather?")
    client = app.test_client()
    folded = format_prompt("Weather?", 'S\n\nAssistant: {"name": "weather", "arguments": {"city": "Oslo"}}\nTool: -3C')
    ids = inference.encode_prompt(folded, raw=True)
    assert post(client, "/tokenize", {"messages": msgs}).get_json()["tokens"] == ids
    body = post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2}).get_json()
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_forced_tool_calls_whole_and_streamed(app):
    client = app.test_client()
    tools = TOOLS + [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False}}}]
    valid = {"weather": [{"city": "Oslo"}, {"city": "Lima"}], "add": [{"a": 1}, {"a": 2}]}
    for choice in ({"type": "function", "function": {"name": "add"}}, "required"):  # a schema; a grammar
        req = {"messages": CHAT, "tools": tools, "tool_choice": choice, "max_tokens": 40, "temperature": 0}
        (c,) = post(client, "/v1/chat/completions", req).get_json()["choices"]
        (call,) = c["message"]["tool_calls"]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None and call["id"].startswith("call_")
        assert json.loads(call["function"]["arguments"]) in valid[call["function"]["name"]]
        events = sse_events(post(client, "/v1/chat/completions", {**req, "stream": True}).get_data(as_text=True))
        deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
        parts = [t for d in deltas for t in d["delta"].get("tool_calls", [])]
        assert parts[0]["function"] == {"name": call["function"]["name"], "arguments": ""} and parts[0]["id"]
        assert "".join(p["function"]["arguments"] for p in parts) == call["function"]["arguments"]
        assert {p["index"] for p in parts} == {0} and deltas[-1]["finish_reason"] == "tool_calls"
    body = post(client, "/v1/chat/completions", {"messages": CHAT, "tools": tools, "tool_choice": "none",
                                                 "max_tokens": 2}).get_json()
    assert "tool_calls" not in body["choices"][0]["message"]


def test_openai_noop_values_are_accepted(app):
    client = app.test_client()
    body = {"messages": CHAT, "max_completion_tokens": 2, "n": 1, "frequency_penalty": 0.5, "presence_penalty": -1,
            "logprobs": False, "user": "u1", "stop": "\n\n", "response_format": {"type": "text"},
            "tool_choice": "none", "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "logit_bias": {"11": -5},
            "seed": None, "stream": False}
    r = post(client, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] <= 2, r.get_data(as_text=True)
    r = post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1, "echo": False, "best_of": 1, "logprobs": None})
    assert r.status_code == 200, r.get_data(as_text=True)


def test_logit_bias_steers_greedy_decoding(app):
    client = app.test_client()
    target = encode(" banana")[0]
    body = post(client, "/v1/completions", {"prompt": "I like", "max_tokens": 3, "temperature": 0,
                                            "logit_bias": {str(target): 100}}).get_json()
    assert body["choices"][0]["text"] == " banana" * 3


# ---------------------------------------------------------------------- OpenAI responses

RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                   "response.content_part.done", "response.output_item.done"]


def test_responses_shape_and_stream_match_chat(app):
    client = app.test_client()
    req = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Bye"}]}], "instructions": "Be brief.",
           "max_output_tokens": 6, "temperature": 0, "metadata": {"k": "v"}}
    body = post(client, "/v1/responses", req).get_json()
    chat = post(client, "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Bye"}],
                                                 "max_tokens": 6, "temperature": 0}).get_json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["metadata"] == {"k": "v"}
    (item,) = body["output"]
    text = chat["choices"][0]["message"]["content"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["content"][0]["text"] == text
    assert body["status"] == ("incomplete" if chat["choices"][0]["finish_reason"] == "length" else "completed")
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    r = post(client, "/v1/responses", {**req, "stream": True})
    blocks = [b.split("\n") for b in r.get_data(as_text=True).split("\n\n") if b]
    events = [(b[0][len("event: "):], json.loads(b[1][len("data: "):])) for b in blocks]
    assert all(name == e["type"] for name, e in events) and [e["sequence_number"] for _, e in events] == list(
        range(len(events)))
    names = [name for name, _ in events]
    assert [n for i, n in enumerate(names) if n not in names[:i]][:-1] == RESPONSE_EVENTS
    assert names[-1] == "response." + body["status"]
    assert "".join(e["delta"] for n, e in events if n.endswith(".delta")) == text
    done = events[-1][1]["response"]
    assert done["output"][0]["content"] == item["content"] and events[0][1]["response"]["status"] == "in_progress"


# ---------------------------------------------------------------------- tokenizer, embeddings, models, docs


def test_tokenize_detokenize_round_trip(app):
    client = app.test_client()
    text = "Héllo wörld 👋 <|endoftext|>"
    body = post(client, "/tokenize", {"prompt": text, "return_token_strs": True}).get_json()
    assert body["tokens"] == encode(text) and body["count"] == len(encode(text)) and body["max_model_len"] == CTX
    assert len(body["token_strs"]) == body["count"]
    assert post(client, "/detokenize", {"tokens": body["tokens"]}).get_json() == {"prompt": text}
    assert post(client, "/tokenize", {"content": text}).get_json()["tokens"] == encode(text)  # llama.cpp's body
    chat = post(client, "/tokenize", {"messages": CHAT}).get_json()
    assert chat["tokens"] == inference.encode_prompt("Say hi.")


def test_embeddings(app):
    client = app.test_client()
    body = post(client, "/v1/embeddings", {"input": ["a cat", "a dog"], "model": "x"}).get_json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    vec = body["data"][0]["embedding"]
    assert sum(v * v for v in vec) == pytest.approx(1.0, abs=1e-4)
    n = len(encode("a cat")) + len(encode("a dog"))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    b64 = post(client, "/v1/embeddings", {"input": encode("a cat"), "encoding_format": "base64"}).get_json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vec, abs=1e-5)


def test_models_params_and_openapi(app):
    client = app.test_client()
    body = client.get("/v1/models").get_json()
    assert [m["id"] for m in body["data"]] == ["tiny"] and client.get("/v1/models/tiny").get_json()["id"] == "tiny"
    assert error_of(client.get("/v1/models/gpt-4"), 404)["param"] == "model"
    params = client.get("/params").get_json()
    assert params["context_length"] == CTX and params["params"]["max_new_tokens"]["max"] == CTX - 1
    assert set(inference.PARAM_RANGES) <= set(params["params"])
    doc = client.get("/openapi.json").get_json()
    routes = {rule.rule.replace("<path:model_id>", "{model_id}") for rule in app.url_map.iter_rules()
              if "filename" not in rule.rule and rule.rule != "/"}
    assert routes == set(doc["paths"])
    gen = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for name, spec in inference.PARAM_RANGES.items():  # built from the one parameter table
        assert spec["help"] in json.dumps(gen[name])


def test_metrics(app):
    client = app.test_client()
    before = client.get("/metrics").get_data(as_text=True)
    assert post(client, "/generate", {"prompt": "hi", "max_new_tokens": 3, "ignore_eos": True}).status_code == 200
    post(client, "/generate", {"prompt": 1})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    ok = 'gpt2i_requests_total{endpoint="/generate",status="200"}'
    assert metric(text, ok) >= (metric(before, ok) or 0) + 1
    assert metric(text, 'gpt2i_requests_total{endpoint="/generate",status="400"}') >= 1
    done = 'gpt2i_tokens_total{kind="completion"}'
    assert metric(text, done) >= (metric(before, done) or 0) + 3
    for name in ("gpt2i_requests_waiting", "gpt2i_requests_running", "gpt2i_kv_slots_used"):
        assert metric(text, name) == 0, name
    for name in ("gpt2i_time_to_first_token_seconds_count", "gpt2i_inter_token_latency_seconds_count"):
        assert metric(text, name) >= (metric(before, name) or 0) + 1, name  # ITL: one observation per output
    assert metric(text, "gpt2i_model_loaded") == 1


def test_a_repeated_prompt_hits_the_prefix_cache(app):
    client = app.test_client()
    hits = "gpt2i_prefix_cache_hits_total"
    before = metric(client.get("/metrics").get_data(as_text=True), hits)
    body = {"prompt": list(range(1000, 1040)), "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    texts = [post(client, "/v1/completions", body).get_json()["choices"][0]["text"] for _ in range(2)]
    text = client.get("/metrics").get_data(as_text=True)
    assert texts[0] == texts[1] and metric(text, hits) >= before + 1
    assert metric(text, "gpt2i_prefix_cache_hit_tokens_total") >= 32  # two 16-token blocks of 40 tokens
    assert 2 <= metric(text, "gpt2i_prefix_cache_blocks_used") <= metric(text, "gpt2i_prefix_cache_blocks_total")
    cache = client.get("/health").get_json()["prefix_cache"]
    assert cache["enabled"] and cache["hits"] >= 1 and "prefix_cache" not in client.get("/health").get_json()["queue"]


def test_one_log_line_per_request(app, capsys):
    client = app.test_client()
    capsys.readouterr()
    post(client, "/generate", {"prompt": "hi", "max_new_tokens": 2}, headers={"X-Request-ID": "log-1"})
    r = post(client, "/generate", {"prompt": "hi", "max_new_tokens": 2, "stream": True}, headers={"X-Request-ID": "log-2"})
    r.get_data()
    r.close()
    client.get("/health")  # debug level: not logged at info
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["request_id"] for line in lines] == ["log-1", "log-2"]
    for line, stream in zip(lines, (False, True)):
        assert line["endpoint"] == "/generate" and line["status"] == 200 and line["stream"] is stream
        assert line["prompt_tokens"] == len(inference.encode_prompt("hi")) and 1 <= line["completion_tokens"] <= 2


def test_index_and_static_files(guarded, ckpt, tmp_path):
    client = guarded.test_client()
    assert b"<title>chat</title>" in client.get("/").data
    assert client.get("/app.js").data == b"console.log(1)"
    assert error_of(client.get("/missing.js"), 404)["type"] == "not_found"
    error_of(client.get("/../serve.py"), 404)
    server = EngineClient(serve.make_config({"ckpt": ckpt, "static_dir": str(tmp_path / "none")}))
    assert "/openapi.json" in error_of(build_app(server).test_client().get("/"), 404)["message"]


def test_hostile_and_mangled_constraints_are_400_or_bounded(app):
    """Every hostile spec of the grammar tests and mangled schemas, in each request form: a 400 naming the
    field, a 413 for the largest bodies, or a bounded generation; never a 5xx. 50 requests, 2 new tokens each."""
    client, rng = app.test_client(), random.Random(1)
    forms = {"json_schema": lambda s: {"response_format": {"type": "json_schema", "json_schema": {"schema": s}}},
             "regex": lambda s: {"structured_outputs": {"regex": s}}, "choice": lambda s: {"guided_choice": s},
             "grammar": lambda s: {"guided_grammar": s}}
    bodies = [forms[kind](spec) for kind, spec in HOSTILE]
    texts = [json.dumps(s) for s in SCHEMAS.values()]
    for _ in range(50 - len(bodies)):
        text = list(rng.choice(texts))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            text[i:i + rng.randint(0, 3)] = rng.choice(['"x"', "-1", "null", "[]", "{}", '"^("', "", "[[[[", '"}'])
        bodies.append(rng.choice([{"guided_json": "".join(text)}, {"structured_outputs": {"json": "".join(text)}}]))
    statuses = []
    for body in bodies:
        r = post(client, "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
        statuses.append(r.status_code)
        assert r.status_code in (200, 400, 413), r.get_data(as_text=True)[:300]  # 413: past --max-body-bytes
        if r.status_code == 400:
            err = r.get_json()["error"]
            assert err["param"].split(".")[0] in body and err["message"].startswith(err["param"])
    assert 200 in statuses and 400 in statuses
