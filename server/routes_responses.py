"""POST /v1/responses, OpenAI's Responses API: its input folds into the template as a chat does, and its
reply is one message (a Response object, or the documented stream of events). Nothing is stored."""

import itertools
import time

from flask import Blueprint, g, jsonify

from server.config import invalid
from server.render import sse
from server.respond import admit, client, fit_prompt, respond
from server.routes_openai import chat_prompt
from server.schema import RESPONSE_FIELDS, read_body, sampling_params, short

bp = Blueprint("responses", __name__)
TEXT_PARTS = ("input_text", "output_text", "text")


def input_messages(value):
    """Responses input (a string, or message / function_call / function_call_output items) -> chat messages,
    one per item so that errors name input[i]."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        raise invalid("input", f"input must be a string or a non-empty list of items (objects), got {short(value)}")
    messages = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):  # input_text / output_text parts are chat's text parts
                content = [{"type": "text", "text": part.get("text")} if isinstance(part, dict)
                           and part.get("type") in TEXT_PARTS else part for part in content]
            messages.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"function": {"name": item.get("name"), "arguments": item.get("arguments")}}]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": item.get("output")})
        else:
            raise invalid(f"input[{i}].type", f"input[{i}].type must be message, function_call or "
                                              f"function_call_output, got {short(kind)}")
    return messages


def part(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@bp.post("/v1/responses")
def responses():
    body, given, names = read_body(RESPONSE_FIELDS, "/v1/responses")
    names.setdefault("max_new_tokens", "max_output_tokens")
    p = sampling_params(given, names, body=body)  # text.format: a constraint (grammar.FORMS)
    ids = chat_prompt(input_messages(body["input"]), p, given, name="input", instructions=body.get("instructions"))
    stream = bool(body.get("stream"))
    reply = admit([(ids, fit_prompt(ids, p, given, names, "input"))], stream)
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
