"""serve.py through Flask's test client, on a tiny random-weight checkpoint: every endpoint, every
error status, SSE framing and the OpenAI response shapes."""

import json

import pytest

import inference
import serve
from prompt import format_prompt
from test_serve_config import close_app, make_app, make_checkpoint, metric, sse_events

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


@pytest.fixture(scope="module")
def limited(ckpt):
    app = make_app(ckpt, rate_limit="3/minute")
    yield app
    close_app(app)


def post(client, path, body, **kw):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


def error_of(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert set(err) == {"type", "message", "param"} and err["message"]
    return err


AUTH = {"Authorization": "Bearer sekrit"}

# ---------------------------------------------------------------------- health and loading


def test_health_is_503_while_loading_then_200(ckpt):
    server = serve.Server(serve.make_config({"ckpt": ckpt, "rate_limit": "none", "model_name": "m"}))
    client = server.build_app().test_client()  # engine not started yet: the model is "loading"
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json() == {"status": "loading"} and int(r.headers["Retry-After"]) > 0
    err = error_of(post(client, "/generate", {"prompt": "hi"}), 503)
    assert err["type"] == "model_loading"
    assert client.get("/params").get_json()["context_length"] is None
    assert client.get("/v1/models").status_code == 200
    server.engine.start()
    try:
        assert server.engine.wait_ready(120)
        body = client.get("/health").get_json()
        assert body["status"] == "ok" and body["model"] == "m" and body["device"] == "cpu"
        assert body["context_length"] == CTX and body["dtype"] == "float32"
    finally:
        server.close()


def test_health_reports_a_load_failure(tmp_path):
    app = serve.create_app({"ckpt": str(tmp_path / "missing" / "ckpt.pt"), "log_level": "error"})
    try:
        assert not app.extensions["gpt2i"].engine.wait_ready(60)
        client = app.test_client()
        r = client.get("/health")
        assert r.status_code == 503
        body = r.get_json()
        assert body["status"] == "error" and "missing" in body["error"]
        err = error_of(post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 503)
        assert err["type"] == "model_error" and "missing" in err["message"]
    finally:
        close_app(app)


# ---------------------------------------------------------------------- /generate


def test_generate_plain_reply(app):
    client = app.test_client()
    r = post(client, "/generate", {"prompt": "Name a colour.", "max_new_tokens": 6, "seed": 7},
             headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42"
    body = r.get_json()
    assert set(body) >= {"text", "finish_reason", "usage", "timings"}
    assert body["finish_reason"] in ("eos", "stop", "length")
    assert body["usage"]["prompt_tokens"] == inference.count_tokens("Name a colour.")
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert {"queue_ms", "prefill_ms", "decode_ms", "total_ms"} <= set(body["timings"])
    # a request id is made up when the client sends none (or a malformed one)
    r = post(client, "/generate", {"prompt": "x", "max_new_tokens": 1}, headers={"X-Request-ID": "bad id <x>"})
    assert len(r.headers["X-Request-ID"]) == 32


def test_generate_matches_inference_and_seed_is_reproducible(app):
    client = app.test_client()
    req = {"prompt": "Write a word.", "max_new_tokens": 12, "seed": 123, "temperature": 0.9, "top_k": 40}
    first, second = (post(client, "/generate", req).get_json() for _ in range(2))
    assert first["text"] == second["text"]
    model = app.extensions["gpt2i"].engine.model
    direct = inference.generate_text(model, "Write a word.", max_new_tokens=12, seed=123, temperature=0.9, top_k=40)
    assert first["text"] == direct["text"] and first["usage"]["completion_tokens"] == direct["completion_tokens"]


def test_generate_context_and_raw(app):
    client = app.test_client()
    body = post(client, "/generate", {"prompt": "Summarize.", "context": "Cats sleep.", "max_new_tokens": 2}).get_json()
    assert body["usage"]["prompt_tokens"] == inference.count_tokens(format_prompt("Summarize.", "Cats sleep."), raw=True)
    body = post(client, "/generate", {"prompt": "Once upon a time", "raw": True, "max_new_tokens": 2}).get_json()
    assert body["usage"]["prompt_tokens"] == inference.count_tokens("Once upon a time", raw=True)
    err = error_of(post(client, "/generate", {"prompt": "x", "context": "y", "raw": True}), 422)
    assert err["param"] == "context"


def test_generate_stream_sse_framing(app):
    client = app.test_client()
    req = {"prompt": "Count to three.", "max_new_tokens": 10, "seed": 5}
    plain = post(client, "/generate", req).get_json()
    r = post(client, "/generate", {**req, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    events = [json.loads(e) for e in sse_events(r.get_data(as_text=True))]
    *tokens, done = events
    assert all(set(e) == {"token"} and isinstance(e["token"], str) for e in tokens)
    assert "".join(e["token"] for e in tokens) == plain["text"]
    assert done["done"] is True and done["finish_reason"] == plain["finish_reason"]
    assert done["usage"] == plain["usage"] and "total_ms" in done["timings"]


def test_generate_stop_string(app):
    client = app.test_client()
    full = post(client, "/generate", {"prompt": "Go on.", "max_new_tokens": 24, "temperature": 0,
                                      "ignore_eos": True}).get_json()["text"]
    assert len(full) > 8
    stop = full[len(full) // 2:len(full) // 2 + 3]
    body = post(client, "/generate", {"prompt": "Go on.", "max_new_tokens": 24, "temperature": 0,
                                      "ignore_eos": True, "stop": [stop]}).get_json()
    assert body["finish_reason"] == "stop" and body["text"] == full[:full.index(stop)]


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", "10"), ("max_new_tokens", 2.5),
    ("temperature", 2.5), ("temperature", -0.1), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 10**6), ("top_p", 0), ("top_p", 1.5),
    ("repetition_penalty", 0.5), ("repetition_penalty", 3),
    ("seed", -1), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", 3), ("stop", ["x" * 65]),
    ("raw", "yes"), ("ignore_eos", 1), ("stream", "true"), ("prompt", 42), ("context", ["a"]),
])
def test_generate_invalid_field_is_422_naming_it(app, field, value):
    body = {"prompt": "hi", field: value}
    err = error_of(post(app.test_client(), "/generate", body), 422)
    assert err["type"] == "invalid_parameter" and err["param"] == field
    assert field in err["message"]
    spec = inference.PARAM_RANGES.get(field, {})
    for bound in ("min", "max"):  # the allowed range is in the message
        if isinstance(spec.get(bound), (int, float)) and not isinstance(spec.get(bound), bool):
            assert str(spec[bound]) in err["message"], err["message"]


def test_generate_missing_prompt_and_unknown_fields(app):
    client = app.test_client()
    err = error_of(post(client, "/generate", {"max_new_tokens": 3}), 422)
    assert err["param"] == "prompt" and "required" in err["message"]
    err = error_of(post(client, "/generate", {"prompt": "hi", "temprature": 0.5}), 422)
    assert err["param"] == "temprature" and "unknown field" in err["message"] and "temperature" in err["message"]
    err = error_of(post(client, "/generate", {"prompt": "  "}), 422)
    assert err["param"] == "prompt"


@pytest.mark.parametrize("data", [b"{", b'{"prompt": "x",}', b"", b"[1, 2]", b'"text"', b'{"prompt": NaN}',
                                  b"\xff\xfe"])
def test_malformed_json_is_400(app, data):
    err = error_of(app.test_client().post("/generate", data=data, content_type="application/json"), 400)
    assert err["type"] == "invalid_json"


def test_body_too_large_is_413(guarded):
    r = guarded.test_client().post("/generate", data=json.dumps({"prompt": "x" * 5000}),
                                   content_type="application/json", headers=AUTH)
    err = error_of(r, 413)
    assert err["type"] == "request_too_large" and "4096" in err["message"]


def test_prompt_and_context_limits(app, guarded):
    client = app.test_client()
    long_text = "word " * 300
    err = error_of(post(client, "/generate", {"prompt": long_text, "raw": True}), 422)
    assert err["param"] == "prompt" and str(CTX) in err["message"]
    n = inference.count_tokens("word " * 150, raw=True)
    err = error_of(post(client, "/generate", {"prompt": "word " * 150, "raw": True, "max_new_tokens": 200}), 422)
    assert err["param"] == "max_new_tokens" and str(CTX - n) in err["message"]
    # an unspecified max_new_tokens is lowered to what fits instead
    body = post(client, "/generate", {"prompt": "word " * 150, "raw": True, "ignore_eos": True}).get_json()
    assert body["usage"]["completion_tokens"] == min(inference.DEFAULTS["max_new_tokens"], CTX - n)
    assert body["finish_reason"] == "length"
    # --max-prompt-tokens
    err = error_of(post(guarded.test_client(), "/generate", {"prompt": "word " * 70, "raw": True}, headers=AUTH), 422)
    assert err["param"] == "prompt" and "64" in err["message"]


# ---------------------------------------------------------------------- other statuses


def test_404_405_500_are_json(app, ckpt):
    client = app.test_client()
    assert error_of(client.get("/nope"), 404)["type"] == "not_found"
    assert error_of(client.post("/v2/anything", json={}), 404)["type"] == "not_found"
    r = client.get("/generate")
    assert error_of(r, 405)["type"] == "method_not_allowed" and "POST" in r.headers["Allow"]
    assert error_of(client.delete("/health"), 405)["type"] == "method_not_allowed"
    # an unexpected exception in a view: 500 JSON with the request id, no traceback
    server = serve.Server(serve.make_config({"ckpt": ckpt, "rate_limit": "none"}))
    broken = server.build_app()

    def boom():
        raise RuntimeError("secret detail")

    broken.add_url_rule("/boom", "boom", boom)
    r = broken.test_client().get("/boom", headers={"X-Request-ID": "r500"})
    err = error_of(r, 500)
    assert err["type"] == "server_error" and "r500" in err["message"] and "secret" not in err["message"]


def test_api_key(guarded):
    client = guarded.test_client()
    req = {"prompt": "hi", "max_new_tokens": 1}
    ip = {"REMOTE_ADDR": "10.9.0.1"}
    r = post(client, "/generate", req, environ_base=ip)
    assert error_of(r, 401)["type"] == "authentication_error" and r.headers["WWW-Authenticate"] == "Bearer"
    error_of(post(client, "/generate", req, headers={"Authorization": "Bearer wrong"}, environ_base=ip), 401)
    error_of(post(client, "/generate", req, headers={"Authorization": "Basic sekrit"}, environ_base=ip), 401)
    error_of(client.get("/v1/models"), 401)
    error_of(client.get("/metrics"), 401)
    assert post(client, "/generate", req, headers=AUTH, environ_base=ip).status_code == 200
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    for open_path in ("/health", "/params", "/", "/app.js", "/static/app.js"):
        assert client.get(open_path).status_code == 200, open_path


def test_cors(app, guarded):
    r = app.test_client().get("/health", headers={"Origin": "http://page.example"})
    assert "Access-Control-Allow-Origin" not in r.headers  # none by default
    client = guarded.test_client()
    r = client.get("/health", headers={"Origin": "http://page.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://page.example"
    assert "X-Request-ID" in r.headers["Access-Control-Expose-Headers"]
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "http://page.example"
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    r = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_rate_limit_429_after_n_requests(limited):
    client = limited.test_client()
    ip = {"REMOTE_ADDR": "10.1.0.1"}
    bodies = [("/generate", {"prompt": "a", "max_new_tokens": 1}),
              ("/v1/completions", {"prompt": "a", "max_tokens": 1}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1})]
    for i, (path, body) in enumerate(bodies):  # one budget shared by the generation endpoints
        r = post(client, path, body, environ_base=ip)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.headers["X-RateLimit-Limit"] == "3" and r.headers["X-RateLimit-Remaining"] == str(2 - i)
        assert "Retry-After" not in r.headers
    r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, environ_base=ip)
    err = error_of(r, 429)
    assert err["type"] == "rate_limit_exceeded" and "3 per 1 minute" in err["message"]
    assert 0 < int(r.headers["Retry-After"]) <= 60
    # exempt: health, params, metrics, models, the page
    for path in ("/health", "/params", "/metrics", "/v1/models", "/") * 3:
        assert client.get(path, environ_base=ip).status_code == 200, path
    # another client has its own budget; X-Forwarded-For is ignored without --trust-proxy
    assert post(client, "/generate", {"prompt": "a", "max_new_tokens": 1},
                environ_base={"REMOTE_ADDR": "10.1.0.2"}).status_code == 200
    r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, environ_base=ip,
             headers={"X-Forwarded-For": "1.2.3.4"})
    assert r.status_code == 429


def test_trusted_proxy_limits_by_forwarded_address(guarded):
    client = guarded.test_client()
    proxy = {"REMOTE_ADDR": "10.2.0.1"}
    for _ in range(3):
        r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, headers={**AUTH, "X-Forwarded-For": "5.5.5.5"},
                 environ_base=proxy)
        assert r.status_code == 200
    r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, headers={**AUTH, "X-Forwarded-For": "5.5.5.5"},
             environ_base=proxy)
    assert r.status_code == 429
    r = post(client, "/generate", {"prompt": "a", "max_new_tokens": 1}, headers={**AUTH, "X-Forwarded-For": "6.6.6.6"},
             environ_base=proxy)
    assert r.status_code == 200  # same proxy, another client


def test_queue_full_is_503_with_retry_after(ckpt):
    app = make_app(ckpt, max_queue=1)
    try:
        client = app.test_client()
        held = post(client, "/generate", {"prompt": "x", "max_new_tokens": 2, "stream": True})
        assert held.status_code == 200  # admitted; its stream is not read yet, so it holds the only slot
        r = post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        err = error_of(r, 503)
        assert err["type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert client.get("/health").status_code == 200
        assert app.extensions["gpt2i"].engine.admitted() == 1
        held.close()  # the client is done: the slot is free again
        assert app.extensions["gpt2i"].engine.admitted() == 0
        assert post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        close_app(app)


# ---------------------------------------------------------------------- OpenAI-compatible


def test_completions_shape(app):
    client = app.test_client()
    r = post(client, "/v1/completions", {"model": "whatever", "prompt": "The sky is", "max_tokens": 5, "seed": 1})
    body = r.get_json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == inference.count_tokens("The sky is", raw=True)  # raw by default
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    templated = post(client, "/v1/completions", {"prompt": "The sky is", "max_tokens": 1, "raw": False}).get_json()
    assert templated["usage"]["prompt_tokens"] == inference.count_tokens("The sky is")
    default = post(client, "/v1/completions", {"prompt": ["a b"], "temperature": 0}).get_json()
    assert default["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens


def test_completions_stream_chunks(app):
    client = app.test_client()
    req = {"prompt": "One two", "max_tokens": 6, "temperature": 0}
    plain = post(client, "/v1/completions", req).get_json()
    r = post(client, "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    *texts, final, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in texts) == plain["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in texts)
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_chat_completion_shape_and_stream(app):
    client = app.test_client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    req = {"model": "tiny", "messages": msgs, "max_tokens": 6, "temperature": 0}
    body = post(client, "/v1/chat/completions", req).get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    folded = format_prompt("Bye", "Be brief.\n\nUser: Hi\nAssistant: Hello.")
    assert body["usage"]["prompt_tokens"] == inference.count_tokens(folded, raw=True)

    r = post(client, "/v1/chat/completions", {**req, "stream": True})
    events = sse_events(r.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


def test_chat_folding_rules(app):
    system, history, last = serve.split_chat([
        {"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "U2"}])
    assert (system, history, last) == ("S1\n\nS2", [("user", "U1"), ("assistant", "A1")], "U2")
    assert serve.chat_context(system, history) == "S1\n\nS2\n\nUser: U1\nAssistant: A1"
    assert serve.split_chat([{"role": "user", "content": "only"}]) == ("", [], "only")
    # too long a history: the oldest turns go first, the system text and the last message stay
    server = app.extensions["gpt2i"]
    turns = [("user" if i % 2 == 0 else "assistant", f"turn{i} " + "blah " * 30) for i in range(12)]
    text, n = server.fold_chat("SYSTEM", turns, "LAST", 1)
    assert n <= CTX - 1 and "SYSTEM" in text and "LAST" in text and "turn11" in text and "turn0 " not in text
    assert n == inference.count_tokens(text, raw=True)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"n": 2}, "n"), ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": -1}, "presence_penalty"),
    ({"max_tokens": 10**6}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"stop": ["a"] * 5}, "stop"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"foo": 1}, "foo"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
])
def test_chat_param_errors(app, body, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    err = error_of(post(app.test_client(), "/v1/chat/completions", body), 422)
    assert err["param"] == param, err
    if param == "max_tokens":
        assert "max_new_tokens" not in err["message"] and "max_tokens" in err["message"]


def test_openai_noop_values_are_accepted(app):
    client = app.test_client()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2, "n": 1,
            "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "user": "u1", "stop": "\n\n",
            "response_format": {"type": "text"}, "tool_choice": "none", "top_k": 5, "repetition_penalty": 1.1}
    r = post(client, "/v1/chat/completions", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["usage"]["completion_tokens"] <= 2
    r = post(client, "/v1/completions", {"prompt": "x", "max_tokens": 1, "echo": False, "best_of": 1, "logprobs": None})
    assert r.status_code == 200, r.get_data(as_text=True)
    err = error_of(post(client, "/v1/completions", {"prompt": "x", "echo": True}), 422)
    assert err["param"] == "echo"
    err = error_of(post(client, "/v1/completions", {"max_tokens": 1}), 422)
    assert err["param"] == "prompt"


def test_models(app):
    client = app.test_client()
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model" and "owned_by" in body["data"][0]
    assert client.get("/v1/models/tiny").get_json()["id"] == "tiny"
    assert error_of(client.get("/v1/models/gpt-4"), 404)["param"] == "model"


# ---------------------------------------------------------------------- params, metrics, logs, page


def test_params_table(app):
    body = app.test_client().get("/params").get_json()
    assert body["context_length"] == CTX and body["max_prompt_tokens"] == CTX - 1
    p = body["params"]
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed", "stop"):
        assert name in p
    assert (p["temperature"]["min"], p["temperature"]["max"]) == (inference.PARAM_RANGES["temperature"]["min"],
                                                                  inference.PARAM_RANGES["temperature"]["max"])
    assert p["max_new_tokens"]["max"] == CTX - 1 and p["max_new_tokens"]["default"] == inference.DEFAULTS["max_new_tokens"]


def test_metrics_exposition(app):
    client = app.test_client()
    before = client.get("/metrics").get_data(as_text=True)
    r = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3, "ignore_eos": True}, buffered=True)
    assert r.status_code == 200
    client.post("/generate", json={"prompt": 1}, buffered=True)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    ok = 'gpt2i_requests_total{endpoint="/generate",status="200"}'
    assert (metric(text, ok) or 0) >= (metric(before, ok) or 0) + 1
    assert metric(text, 'gpt2i_requests_total{endpoint="/generate",status="422"}') >= 1
    assert metric(text, "gpt2i_generated_tokens_total") >= (metric(before, "gpt2i_generated_tokens_total") or 0) + 3
    assert metric(text, "gpt2i_model_loaded") == 1 and metric(text, "gpt2i_queue_depth") == 0
    buckets = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('gpt2i_request_latency_seconds_bucket{endpoint="/generate"')]
    assert len(buckets) == len(serve.LATENCY_BUCKETS) + 1 and buckets == sorted(buckets)
    assert buckets[-1] == metric(text, 'gpt2i_request_latency_seconds_count{endpoint="/generate"}')
    for line in text.splitlines():  # every sample line is `name{labels} value`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_one_json_log_line_per_request(app, capsys):
    client = app.test_client()
    capsys.readouterr()
    client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"X-Request-ID": "log-1"},
                buffered=True)
    client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "stream": True},
                headers={"X-Request-ID": "log-2"}, buffered=True)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines if line.get("event") == "request"}
    for rid, stream in (("log-1", False), ("log-2", True)):
        line = by_id[rid]
        assert line["endpoint"] == "/generate" and line["status"] == 200 and line["stream"] is stream
        assert line["prompt_tokens"] == inference.count_tokens("hi") and 1 <= line["completion_tokens"] <= 2
        assert line["latency_ms"] > 0 and line["finish_reason"] in ("eos", "length")


def test_index_and_static_files(guarded, ckpt, tmp_path):
    client = guarded.test_client()
    r = client.get("/")
    assert r.status_code == 200 and b"<title>chat</title>" in r.data
    assert client.get("/app.js").data == b"console.log(1)"
    assert client.get("/static/app.js").status_code == 200
    assert error_of(client.get("/missing.js"), 404)["type"] == "not_found"
    assert error_of(client.get("/static/../serve.py"), 404)
    # no static folder at all: a small note, not a 500
    server = serve.Server(serve.make_config({"ckpt": ckpt, "static_dir": str(tmp_path / "none")}))
    bare = server.build_app().test_client()
    r = bare.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html" and b"/generate" in r.data
    assert bare.get("/app.js").status_code == 404
