"""The native routes: /health, /params, /generate, /tokenize, /detokenize, /metrics, /openapi.json and
the chat page with its static files."""

import os

from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import MethodNotAllowed, NotFound

from engine.detokenizer import encode_prompt
from engine.sampling_params import PARAM_RANGES, check_ids, check_prompt_text
from grammar import FORMS
from prompt import format_prompt
from server.chat import fold_chat
from server.config import ApiError, invalid
from server.respond import admit, client, fit_prompt, native_logprobs, respond, sse, token_str
from server.schema import (DETOKENIZE_FIELDS, NATIVE_FIELDS, TOKENIZE_FIELDS, openapi_document, read_body,
                           sampling_params, short)
from tokenizer import decode, encode

bp = Blueprint("native", __name__)
# the request forms of a constraint (grammar.FORMS): the field holding the spec, the kind of spec, the type
# field that selects it
CONSTRAINTS = [{"field": f.field, "kind": f.kind, "when": dict([f.when]) if f.when else None} for f in FORMS]


@bp.get("/health")
def health():
    server = client()
    if server.status == "ok" and server.accepting:
        queue = {k: v for k, v in server.stats.items() if k != "prefix_cache"}
        return jsonify({"status": "ok", "model": server.model_name, **server.describe(), "restarts": server.restarts,
                        "queue": {**queue, "admitted": server.admitted(), "max_queue": server.config.max_queue},
                        "prefix_cache": server.stats.get("prefix_cache")})
    status = server.status if server.status != "ok" else "shutting_down"
    body = {"status": status, **({"error": server.error} if server.error else {}),
            **({"restarts": server.restarts} if server.restarts else {})}
    return jsonify(body), 503, {"Retry-After": "2" if status in ("loading", "restarting") else "60"}


@bp.get("/params")
def params():
    server = client()
    ctx = server.context_length
    table = {name: dict(spec) for name, spec in PARAM_RANGES.items()}
    if ctx:
        table["max_new_tokens"]["max"] = ctx - 1
    return jsonify({"params": table, "constraints": CONSTRAINTS, "context_length": ctx,
                    "max_prompt_tokens": server.prompt_limit() if ctx else None, "model": server.model_name,
                    "status": server.status})


@bp.post("/generate")
def generate():
    body, given, names = read_body(NATIVE_FIELDS, "/generate")
    p = sampling_params(given, names, body=body)
    check_prompt_text(body["prompt"], p.raw)
    if body.get("context") and p.raw:
        raise invalid("context", "context fills the template's Input block; it cannot be used with raw: true")
    server = client()
    server.require_ready()
    ids = encode_prompt(body["prompt"] if p.raw else format_prompt(body["prompt"], body.get("context", "")), raw=True)
    k, stream = body.get("logprobs"), bool(body.get("stream"))
    reply = admit([(ids, fit_prompt(ids, p, given, names))], stream, logprobs=k)

    def logprobs(entries):
        return {"logprobs": native_logprobs(entries)} if k is not None else {}

    def render(choices):
        c = choices[0]
        return jsonify({"id": g.rq["request_id"], "model": server.model_name, "text": c["text"],
                        "finish_reason": c["finish_reason"], "usage": reply.usage(), "timings": reply.timings(),
                        **logprobs(c["entries"])})

    def chunks(_, out):
        if out.text or (k is not None and out.logprobs):
            yield sse({"token": out.text, **logprobs(out.logprobs)})
        if out.finish_reason is not None:
            yield sse({"done": True, "finish_reason": out.finish_reason, "usage": reply.usage(),
                       "timings": reply.timings()})

    return respond(reply, stream, render, chunks)


@bp.post("/tokenize")
def tokenize():
    body, _, _ = read_body(TOKENIZE_FIELDS, "/tokenize")
    given = [name for name in ("prompt", "content", "messages") if name in body]
    if len(given) != 1:
        raise invalid("prompt", "give exactly one of prompt (text; content in llama.cpp's words) or messages (a chat)")
    if "messages" in body:
        ids = fold_chat(body["messages"], lambda n_tokens: True)  # as the chat route templates it, all turns
    else:
        text = body[given[0]]
        ids = encode(text) if body.get("raw", True) else encode_prompt(text)
    out = {"count": len(ids), "max_model_len": client().context_length, "tokens": ids}
    if body.get("return_token_strs"):
        out["token_strs"] = [token_str(t) for t in ids]
    return jsonify(out)


@bp.post("/detokenize")
def detokenize():
    body, _, _ = read_body(DETOKENIZE_FIELDS, "/detokenize")
    if not isinstance(body["tokens"], list):
        raise invalid("tokens", f"tokens must be a list of token ids, got {short(body['tokens'])}")
    return jsonify({"prompt": decode(check_ids(body["tokens"], "tokens") if body["tokens"] else [])})


@bp.get("/metrics")
def metrics():
    data, content_type = client().metrics.exposition()
    return Response(data, mimetype="text/plain", headers={"Content-Type": content_type})


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


@bp.get("/")
def index():
    folder = current_app.config["STATIC_DIR"]
    if os.path.isfile(os.path.join(folder, "index.html")):
        return send_from_directory(folder, "index.html")
    return Response("<!doctype html><meta charset=utf-8><title>gpt2-instruct</title><p>gpt2-instruct server "
                    "(no chat page installed). API: <code>POST /generate</code>, <code>POST /v1/chat/completions"
                    "</code>, <code>GET /openapi.json</code>.</p>", mimetype="text/html")


@bp.get("/static/<path:filename>", endpoint="static_file")
# every method, so that a POST to a path that is no file is a 404, not a 405 (werkzeug checks the
# method before the converter)
@bp.route("/<staticfile:filename>", endpoint="static_root", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def static_files(filename):
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
    try:
        return send_from_directory(current_app.config["STATIC_DIR"], filename)
    except NotFound:
        raise ApiError(404, "not_found", f"no such route or file: /{filename}") from None
