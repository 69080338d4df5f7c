"""Response shapes: logprobs in the native, chat and legacy-completion forms, OpenAI's finish reasons and
envelopes, Server-Sent Events."""

import json
import time

from engine.detokenizer import token_bytes

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def sse(obj, event=None):
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def openai_finish(reason):
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def token_str(token_id):
    return token_bytes(token_id).decode("utf-8", errors="replace")


def native_logprobs(entries):
    return [{"token": token_str(e["token_id"]), "token_id": e["token_id"], "logprob": e["logprob"],
             "top_logprobs": [{"token": token_str(t), "token_id": t, "logprob": lp} for t, lp in e["top"]]}
            for e in entries]


def chat_logprobs(entries):
    def one(t, lp):
        return {"token": token_str(t), "logprob": lp, "bytes": list(token_bytes(t))}

    return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries, offset):
    """OpenAI's legacy shape; offset: characters of text before these tokens. Prompt entries may be None."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        tok = token_str(e["token_id"])
        out["tokens"].append(tok)
        out["token_logprobs"].append(e["logprob"])
        # the token's own entry first, then its alternatives: up to logprobs + 1 (as OpenAI and vLLM)
        out["top_logprobs"].append(None if e["top"] is None else
                                   {tok: e["logprob"], **{token_str(t): lp for t, lp in e["top"]}})
        out["text_offset"].append(offset)
        offset += len(tok)
    return out


def prompt_entries(ids, prompt_logprobs):
    """Engine prompt_logprobs (the first None) -> entries shaped like generated ones."""
    return [e or {"token_id": t, "logprob": None, "top": None} for t, e in zip(ids, prompt_logprobs)]


def openai_envelope(route, request_id, model_name, include_usage):
    """make(choices, usage, chunk) for one OpenAI reply: its id, object, created and model on every chunk."""
    obj = "text_completion" if route == "/v1/completions" else "chat.completion"
    head = {"id": ("cmpl-" if route == "/v1/completions" else "chatcmpl-") + request_id,
            "object": obj, "created": int(time.time()), "model": model_name, "system_fingerprint": None}

    def make(choices=None, usage=None, chunk=False):
        out = {**head, "choices": choices, "usage": usage}
        if chunk:
            out["object"] = obj if obj == "text_completion" else obj + ".chunk"
            if not include_usage:
                del out["usage"]
        return out

    return make
