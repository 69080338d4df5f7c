"""Chat messages (and the Responses API's input items) -> the instruction template: the last user message is
the instruction; system text and the other turns fill the Input block, the oldest dropped first (docs/design.md)."""

import bisect
import json

from engine.detokenizer import encode_prompt
from prompt import format_prompt
from server.config import invalid
from server.schema import short

ROLES = ("system", "developer", "user", "assistant", "tool")
FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}  # beyond role, content and name
LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def message_text(message, param):
    """A chat message's content as text (a string, or a list of {"type": "text", "text": ...} parts)."""
    param = f"{param}.content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(param, f'{param} must be a string or a list of text parts ({{"type": "text", "text": ...}})')


def call_text(calls, param):
    """An assistant's tool_calls as the lines the model writes for them."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), str) for c in calls):
        raise invalid(param, f"{param} must be a list of {{\"function\": {{\"name\", \"arguments\"}}}} objects")
    return [f'{{"name": {json.dumps(c["function"]["name"])}, "arguments": {c["function"]["arguments"]}}}' for c in calls]


def split_chat(messages, name="messages", instructions=None):
    """messages -> (system text, the other turns [(role, text)], the last user text); validates roles and
    order. The last message is the user's, or a tool's answer to a call made after it."""
    if not isinstance(messages, list) or not messages:
        raise invalid(name, f"{name} must be a non-empty list of {{role, content}} objects")
    system, turns, where = [instructions] if instructions else [], [], []
    for i, m in enumerate(messages):
        param = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise invalid(param, f"{param} must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{param}.role", f"{param}.role must be one of {', '.join(ROLES)}, got {short(role)}")
        extra = set(m) - {"role", "content", "name"} - FIELDS.get(role, set())
        if extra:
            raise invalid(param, f"{param} has unsupported fields: {', '.join(sorted(extra))}")
        text = message_text(m, param)
        if role in ("system", "developer"):
            system.append(text)
            continue
        if m.get("tool_calls") is not None:
            text = "\n".join(([text] if text else []) + call_text(m["tool_calls"], f"{param}.tool_calls"))
        turns.append((role, text))
        where.append(i)
    users = [k for k, (role, _) in enumerate(turns) if role == "user"]
    if not users or turns[-1][0] not in ("user", "tool"):
        raise invalid(name, f"{name}: the last message must have role 'user' (or 'tool', after the user's)")
    last = users[-1]
    if not turns[last][1].strip():
        param = f"{name}[{where[last]}].content"
        raise invalid(param, f"{param}: the last user message must not be empty")
    return "\n\n".join(s for s in system if s), turns[:last] + turns[last + 1:], turns[last][1]


def fold_chat(messages, fits, **split):
    """The templated prompt ids for a chat, keeping the most recent other turns for which fits(n_tokens) holds."""
    system, history, instruction = split_chat(messages, **split)

    def build(drop):  # Input: system text, blank line, then the transcript `User: ...` / `Assistant: ...`
        transcript = "\n".join(f"{LABELS[role]}: {text}" for role, text in history[drop:])
        context = "\n\n".join(part for part in (system, transcript) if part)
        return encode_prompt(format_prompt(instruction, context), raw=True)

    ids = build(0)
    if fits(len(ids)) or not history:
        return ids
    # the fewest oldest turns to drop, by binary search (a few encodings); all of them is the last resort
    return build(1 + bisect.bisect_left(range(1, len(history)), True, key=lambda drop: fits(len(build(drop)))))


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
