"""The routes (docs/design.md lists them), in two blueprints: native, and OpenAI's (/v1/*)."""

import base64
import itertools
import time

import prometheus_client as prom
from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import MethodNotAllowed

from engine.detokenizer import encode_prompt
from engine.sampling_params import PARAM_RANGES, check_ids, check_inputs, check_prompt_text
from grammar import FORMS
from prompt import format_prompt
from server.chat import CallStream, chat_message, fold_chat, input_messages, split_chat, tool_plan
from server.config import ApiError, invalid
from server.respond import (SSE_DONE, admit, chat_logprobs, client, completion_logprobs, native_logprobs,
                            openai_finish, respond, sse, token_str)
from server.schema import (CHAT_FIELDS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, EMBEDDING_FIELDS, NATIVE_FIELDS,
                           RESPONSE_FIELDS, TOKENIZE_FIELDS, openapi_document, prompt_list, read_body, sampling_params)
from tokenizer import decode, encode

native = Blueprint("native", __name__)
openai = Blueprint("openai", __name__)
# /params: each request form of a constraint (grammar.FORMS): its field, its kind, the type field selecting it
CONSTRAINTS = [{"field": f.field, "kind": f.kind, "when": dict([f.when]) if f.when else None} for f in FORMS]


@native.get("/health")
def health():
    server = client()
    if server.status == "ok" and server.accepting:
        queue = {k: v for k, v in server.stats.items() if k != "prefix_cache"}
        return jsonify({"status": "ok", "model": server.model_name, **server.info, "restarts": server.restarts,
                        "queue": {**queue, "admitted": server.admitted(), "max_queue": server.config.max_queue},
                        "prefix_cache": server.stats.get("prefix_cache")})
    status = server.status if server.status != "ok" else "shutting_down"
    body = {"status": status, **({"error": server.error} if server.error else {}),
            **({"restarts": server.restarts} if server.restarts else {})}
    return jsonify(body), 503, {"Retry-After": "2" if status in ("loading", "restarting") else "60"}


@native.get("/params")
def params():
    server = client()
    ctx = server.context_length
    table = {name: dict(spec) for name, spec in PARAM_RANGES.items()}
    if ctx:
        table["max_new_tokens"]["max"] = ctx - 1
    return jsonify({"params": table, "constraints": CONSTRAINTS, "context_length": ctx,
                    "max_prompt_tokens": server.prompt_limit() if ctx else None, "model": server.model_name,
                    "status": server.status})


@native.post("/generate")
def generate():
    body, given, names = read_body(NATIVE_FIELDS, "/generate")
    p = sampling_params(given, names, body)
    check_prompt_text(body["prompt"], p.raw)
    if body.get("context") and p.raw:
        raise invalid("context", "context fills the template's Input block; it cannot be used with raw: true")
    server = client()
    server.require_ready()
    ids = encode_prompt(body["prompt"] if p.raw else format_prompt(body["prompt"], body.get("context", "")), raw=True)
    k, stream = body.get("logprobs"), bool(body.get("stream"))
    reply = admit([ids], p, given, names, stream, logprobs=k)

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


@native.post("/tokenize")
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


@native.post("/detokenize")
def detokenize():
    body, _, _ = read_body(DETOKENIZE_FIELDS, "/detokenize")  # tokens: an array (its schema)
    return jsonify({"prompt": decode(check_ids(body["tokens"], "tokens") if body["tokens"] else [])})


@native.get("/metrics")
def metrics():
    return Response(prom.generate_latest(client().metrics.registry), content_type=prom.CONTENT_TYPE_LATEST)


@native.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


@native.get("/")
def index():  # no page in --static-dir: the JSON 404, which names GET /openapi.json
    return send_from_directory(current_app.config["STATIC_DIR"], "index.html")


# every method: a POST to a path that is no file is a 404, not a 405 (werkzeug checks methods first)
@native.route("/<staticfile:filename>", endpoint="static_root", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def static_files(filename):
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
    return send_from_directory(current_app.config["STATIC_DIR"], filename)  # a missing file: the 404 of any path


def openai_request(route, table, defaults=None):
    """An OpenAI route's body -> (fields, params given, client names, SamplingParams, stream, make, tail);
    make(choices, usage, chunk) puts the reply's id, object, created and model on every chunk."""
    body, given, names = read_body(table, route)
    names.setdefault("max_new_tokens", "max_tokens")
    stream, include_usage = bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))
    if "stream_options" in body and not stream:
        raise invalid("stream_options", "stream_options is only allowed with stream: true")
    text = route == "/v1/completions"
    head = {"id": ("cmpl-" if text else "chatcmpl-") + g.rq["request_id"],
            "object": "text_completion" if text else "chat.completion", "created": int(time.time()),
            "model": client().model_name, "system_fingerprint": None}

    def make(choices, usage=None, chunk=False):
        out = {**head, "choices": choices, "usage": usage}
        if chunk and not text:
            out["object"] += ".chunk"
        if chunk and not include_usage:
            del out["usage"]
        return out

    def tail(reply):
        if include_usage:
            yield sse(make([], reply.usage(), chunk=True))
        yield SSE_DONE

    return body, given, names, sampling_params(given, names, body, defaults), stream, make, tail


@openai.post("/v1/completions")
def completions():
    body, given, names, p, stream, make, tail = openai_request("/v1/completions", COMPLETION_FIELDS,
                                                               {"raw": True, "max_new_tokens": 16})
    prompts = prompt_list(body["prompt"], "prompt")
    echo, n, k = bool(body.get("echo")), body.get("n", 1), body.get("logprobs")
    client().require_ready()
    ids_list = [encode_prompt(q, p.raw) if isinstance(q, str) else q for q in prompts]
    reply = admit(ids_list, p, given, names, stream, n=n, logprobs=k, echo=echo)
    echoed = {i * n + j: decode(ids) for i, ids in enumerate(ids_list) for j in range(n)} if echo else {}

    def echo_of(index, plp):  # the prompt ids with their logprobs, for completion_logprobs
        return None if plp is None else (ids_list[index // n], plp)

    def render(choices):
        return jsonify(make([{"text": echoed.get(i, "") + c["text"], "index": i,
                              "logprobs": completion_logprobs(c["entries"], 0, echo_of(i, c["echo"]))
                              if k is not None else None,
                              "finish_reason": openai_finish(c["finish_reason"])}
                             for i, c in sorted(choices.items())], reply.usage()))

    sent = {}  # choice -> characters of its tokens sent so far (text_offset)

    def chunks(index, out):
        lp = (completion_logprobs(out.logprobs or [], sent.get(index, 0), echo_of(index, out.prompt_logprobs))
              if k is not None else None)
        text = ("" if index in sent else echoed.get(index, "")) + out.text
        sent[index] = sent.get(index, 0) + sum(map(len, lp["tokens"] if lp else []))
        yield sse(make([{"text": text, "index": index, "logprobs": lp,
                         "finish_reason": openai_finish(out.finish_reason)}], chunk=True))

    return respond(reply, stream, render, chunks, tail=lambda: tail(reply))


def chat_prompt(messages, p, given, **split):
    """A chat's prompt ids, folded to fit with room for max_tokens (validated before readiness is asked)."""
    split_chat(messages, **split)
    server = client()
    server.require_ready()
    limit, min_new = server.prompt_limit(), p.max_new_tokens if "max_new_tokens" in given else 1
    return fold_chat(messages, lambda n_: n_ <= limit and n_ + min_new <= server.context_length, **split)


@openai.post("/v1/chat/completions")
def chat_completions():
    body, given, names, p, stream, make, tail = openai_request("/v1/chat/completions", CHAT_FIELDS)
    if "top_logprobs" in body and not body.get("logprobs"):
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    plan = tool_plan(body)
    if plan is not None:
        if p.constraint is not None:
            raise invalid(p.constraint.field, f"{p.constraint.field} cannot be combined with a forced tool call "
                                              f"(tool_choice): the call's arguments are already constrained")
        p = p.replace(constraint=plan.constraint)
    ids = chat_prompt(body["messages"], p, given)
    n, k = body.get("n", 1), (body.get("top_logprobs", 0) if body.get("logprobs") else None)
    reply = admit([ids], p, given, names, stream, "messages", n=n, logprobs=k)

    def render(choices):
        return jsonify(make([{"index": i, "message": m, "finish_reason": openai_finish(finish),
                              "logprobs": chat_logprobs(c["entries"]) if k is not None else None}
                             for i, c in sorted(choices.items())
                             for m, finish in [chat_message(plan, c["text"], c["finish_reason"])]], reply.usage()))

    def chunk(index, delta, finish=None, lp=None):
        return sse(make([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], chunk=True))

    calls = [CallStream(plan) for _ in range(n)] if plan is not None else None

    def chunks(index, out):
        lp = chat_logprobs(out.logprobs) if k is not None else None
        delta, finish = (({"content": out.text} if out.text else None), out.finish_reason) if calls is None \
            else calls[index].piece(out.text, out.finish_reason)
        if delta or (lp and lp["content"]):
            yield chunk(index, delta or {}, lp=lp)
        if finish is not None:
            yield chunk(index, {}, openai_finish(finish))

    head = [chunk(i, {"role": "assistant", "content": "" if plan is None else None}) for i in range(n)]
    return respond(reply, stream, render, chunks, head, lambda: tail(reply))


def part(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@openai.post("/v1/responses")
def responses():
    body, given, names = read_body(RESPONSE_FIELDS, "/v1/responses")
    names.setdefault("max_new_tokens", "max_output_tokens")
    p = sampling_params(given, names, body)  # text.format: a constraint (grammar.FORMS)
    ids = chat_prompt(input_messages(body["input"]), p, given, name="input", instructions=body.get("instructions"))
    stream = bool(body.get("stream"))
    reply = admit([ids], p, given, names, stream, "input")
    rid, server = g.rq["request_id"], client()
    where = {"item_id": "msg_" + rid, "output_index": 0, "content_index": 0}
    head = {"id": "resp_" + rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": server.model_name, "output": [], "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": p.max_new_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "text": body.get("text") or {"format": {"type": "text"}},
            "tools": [], "tool_choice": body.get("tool_choice", "none"), "parallel_tool_calls": False,
            "previous_response_id": None, "store": False, "metadata": body.get("metadata") or {},
            "truncation": "auto", "user": body.get("user"), "usage": None}

    def message(text, status):
        return {"type": "message", "id": where["item_id"], "status": status, "role": "assistant",
                "content": [] if text is None else [part(text)]}

    def final(text, finish_reason):
        status = "incomplete" if finish_reason == "length" else "completed"
        return {**head, "status": status, "output": [message(text, status)],
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": reply.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

    def render(choices):
        return jsonify(final(choices[0]["text"], choices[0]["finish_reason"]))

    seq, sent = itertools.count(), []

    def event(kind, **fields):
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    def chunks(_, out):
        if out.text:
            sent.append(out.text)
            yield event("response.output_text.delta", **where, delta=out.text, logprobs=[])
        if out.finish_reason is not None:
            done = final("".join(sent), out.finish_reason)
            item = done["output"][0]
            yield event("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(f"response.{done['status']}", response=done)

    def failed(e):  # the documented error event, then the response as failed
        yield event("error", code=e.code, message=e.message, param=e.param)
        yield event("response.failed", response={**head, "status": "failed",
                                                 "error": {"code": e.code, "message": e.message}})

    opening = [event("response.created", response=head), event("response.in_progress", response=head),
               event("response.output_item.added", output_index=0, item=message(None, "in_progress")),
               event("response.content_part.added", **where, part=part(""))]
    return respond(reply, stream, render, chunks, opening, failed=failed)


@openai.post("/v1/embeddings")
def embeddings():
    body, _, _ = read_body(EMBEDDING_FIELDS, "/v1/embeddings")
    inputs = prompt_list(body["input"], "input")
    server = client()
    server.require_ready()
    ids_list = [encode_prompt(q, raw=True) if isinstance(q, str) else q for q in inputs]
    check_inputs(ids_list, server.context_length)
    b64 = body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()}
            for i, v in enumerate(server.embed(ids_list))]
    n_tokens = sum(len(ids) for ids in ids_list)
    server.metrics.tokens.labels("prompt").inc(n_tokens)
    return jsonify({"object": "list", "data": data, "model": server.model_name,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


@openai.get("/v1/models")
@openai.get("/v1/models/<path:model_id>")
def models(model_id=None):
    server = client()
    card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gpt2-instruct",
            "context_length": server.context_length}
    if model_id is None:
        return jsonify({"object": "list", "data": [card]})
    if model_id != server.model_name:
        raise ApiError(404, "not_found", f"model {model_id!r} not found; this server has {server.model_name!r}",
                       "model", "model_not_found")
    return jsonify(card)
