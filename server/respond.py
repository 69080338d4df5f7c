"""What every generation route shares: the app's engine client, logprobs in the native, chat and
legacy-completion shapes, SSE, the reply written out (JSON, or SSE with keep-alives and a final error
event), admission of fitted prompts, and the one log line and metrics of a request."""

import functools
import itertools
import json
import logging
import os
import time

from flask import Response, current_app, g, request

from engine.detokenizer import token_bytes
from engine.sampling_params import fit
from server.config import ApiError, ClientGone, invalid
from tokenizer import N_VOCAB

log = logging.getLogger("gpt2i.serve")
SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def client():
    """The EngineClient of the app handling this request."""
    return current_app.extensions["gpt2i"]


def sse(obj, event=None):
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def openai_finish(reason):
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


@functools.cache
def token_strs():
    """Every token's text (invalid UTF-8 replaced), made once, 0.1 s: an echoed prompt renders each of its
    tokens twice, and decoding them one by one was a sixth of the server's work on a loglikelihood request."""
    return [token_bytes(t).decode("utf-8", errors="replace") for t in range(N_VOCAB)]


def token_str(token_id):
    return token_strs()[token_id]


def native_logprobs(entries):
    return [{"token": token_str(e["token_id"]), "token_id": e["token_id"], "logprob": e["logprob"],
             "top_logprobs": [{"token": token_str(t), "token_id": t, "logprob": lp} for t, lp in e["top"]]}
            for e in entries]


def chat_logprobs(entries):
    def one(t, lp):
        return {"token": token_str(t), "logprob": lp, "bytes": list(token_bytes(t))}

    return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries, offset, echo=None):
    """OpenAI's legacy shape; offset: characters of text before these tokens. echo: (prompt ids,
    PromptLogprobs) comes first, rendered from its columns (the first prompt token has no logprob). Each
    top_logprobs entry starts with the token itself, then its alternatives: up to logprobs + 1 (as OpenAI
    and vLLM)."""
    strs, tokens, logprobs, tops = token_strs(), [], [], []
    if echo is not None:
        ids, plp = echo
        tokens, logprobs = [strs[t] for t in ids], [None, *plp.logprob.tolist()]
        # a row's keys: its token, then each alternative (column by column); dict(zip()) per row, in C
        keys = zip(tokens[1:], *([strs[t] for t in column] for column in plp.top_ids.T.tolist()))
        tops = [None, *map(dict, map(zip, keys, zip(logprobs[1:], *plp.top_logprobs.T.tolist())))]
    for e in entries:
        tokens.append(strs[e["token_id"]])
        logprobs.append(e["logprob"])
        tops.append({tokens[-1]: e["logprob"], **{strs[t]: lp for t, lp in e["top"]}})
    starts = itertools.accumulate(map(len, tokens), initial=offset)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": list(starts)[:-1]}


def respond(reply, stream, render, chunks, head=(), tail=lambda: (), failed=None):
    """Non-streamed: wait for every output, then render({choice: {"text", "entries", "echo", "finish_reason"}}).
    Streamed: wait for the first output (so that a queued request can still get a JSON 503), then SSE:
    head, chunks(choice, Output) for each output (keep-alive comments while idle), tail(); an ApiError
    mid-stream ends it with failed(error) (default: an {"error": ...} event, then OpenAI's [DONE])."""
    environ, rq, server = request.environ, g.rq, client()
    rq["stream"] = stream
    try:
        if not stream:
            choices = {}
            for index, out in reply.items(environ):
                c = choices.setdefault(index, {"text": "", "entries": [], "echo": None})
                c["text"] += out.text
                c["entries"] += out.logprobs or []
                c["echo"] = c["echo"] or out.prompt_logprobs
                c["finish_reason"] = out.finish_reason
            server.release(reply)
            return render(choices)
        items = reply.items(environ, keepalive=True)
        first = next(items)
        while first is None:  # still queued: nothing is sent before the first output
            first = next(items)
    except ClientGone:
        server.release(reply)
        reply.drain()
        rq["error"] = "client_gone"
        return Response(status=499)
    except BaseException:
        server.release(reply)
        raise
    done = [SSE_DONE] if request.path.startswith("/v1/") else []
    failed = failed or (lambda e: [sse(e.body()), *done])

    def body():
        try:
            yield from head
            for item in itertools.chain([first], items):
                yield from [SSE_KEEPALIVE] if item is None else chunks(*item)
            yield from tail()
        except ApiError as e:
            rq["error"] = e.code
            yield from failed(e)
        except (ClientGone, GeneratorExit):  # GeneratorExit: the server closed us after a failed write
            rq["error"] = "client_gone"
            server.release(reply)
            reply.drain()
        finally:
            server.release(reply)
            finish_request(rq, rq.get("info"), server)

    return Response(body(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def finish_request(rq, info, server):
    """One log line and the request metrics, once, when the response is done (streams included)."""
    if info is None or rq["logged"]:
        return
    rq["logged"] = True
    latency, reply = time.perf_counter() - rq["t0"], rq["reply"]
    server.metrics.requests.labels(info["endpoint"], str(info["status"])).inc()
    server.metrics.latency.labels(info["endpoint"]).observe(latency)
    line = {"event": "request", "request_id": rq["request_id"], **{k: v for k, v in info.items() if k != "quiet"},
            "stream": rq["stream"], "latency_ms": round(latency * 1e3, 2), "pid": os.getpid()}
    if reply is not None:
        server.release(reply)
        line.update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                    finish_reason=",".join(sorted(set(reply.finish_reasons.values()))) or None)
    if rq["error"]:
        line["error"] = rq["error"]
    log.log(logging.DEBUG if info["quiet"] else logging.INFO, line)


def admit(prompts, p, given, names, stream, field="prompt", n=1, logprobs=None, echo=False):
    """client().admit of prompt ids, each fitted to --max-prompt-tokens and the context (an unspecified
    max_new_tokens is lowered to fit, an explicit one that does not fit is a 400 in the client's words);
    the reply is noted for the request's log line and release."""
    server = client()
    fitted = [(ids, fit(len(ids), p, server.context_length, "max_new_tokens" in given, echo, server.prompt_limit(),
                        field if len(prompts) == 1 else f"{field}[{i}]", names)) for i, ids in enumerate(prompts)]
    if n > server.config.max_batch:
        raise invalid("n", f"n must be at most {server.config.max_batch} here (--max-batch)")
    g.rq["reply"] = server.admit(fitted, stream, n, logprobs, echo)
    return g.rq["reply"]
