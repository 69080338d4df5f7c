"""Chat messages (and the Responses API's input items) -> the instruction template, and the tool calls a request
forces (the model has no tool parser). The rules: docs/design.md "HTTP API"."""

import bisect
import json
import re
import uuid
from dataclasses import dataclass

from engine.detokenizer import encode_prompt
from grammar import JSON_OPTIONS, compile_constraint, make_constraint
from prompt import format_prompt
from server.config import invalid, short

ROLES = ("system", "developer", "user", "assistant", "tool")
FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}  # beyond role, content and name
LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
TEXT_PARTS = ("input_text", "output_text", "text")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128
NO_PARSER = ("this model has no tool parser, so it cannot choose whether to call a tool (tool_choice 'auto', the "
             "default with tools): send tool_choice 'required' or {\"type\": \"function\", \"function\": {\"name\": "
             "...}} to force a call, or 'none'")


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
    return [f'{{"name": {json.dumps(c["function"]["name"])}, "arguments": {c["function"]["arguments"]}}}'
            for c in calls]


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


def head(name):
    """What a call to `name` starts with when several tools are offered; its arguments follow, then "}"."""
    return f'{{"name": "{name}", "arguments": '


@dataclass(frozen=True)
class ToolPlan:
    """The call a request forces: which functions it may call and what their output decodes under."""

    names: tuple  # one name: the output is its arguments; several: {"name": ..., "arguments": ...}
    constraint: object  # a grammar.Constraint, compiled: the parameters schema, or a grammar over the calls

    def split(self, text, final, complete):
        """Output so far -> (function name or None while unknown, arguments text). Not final: the last
        character is held back (it may be the closing brace of the wrapper)."""
        if len(self.names) == 1:
            return self.names[0], text
        name = next((n for n in self.names if text.startswith(head(n))), None)
        args = text[len(head(name)):] if name else ""
        return name, args[:-1] if (not final or complete) and args else args


def chat_message(plan, text, finish_reason):
    """A finished choice -> (its message, finish_reason): its text, or the call a ToolPlan forced."""
    complete = finish_reason in ("eos", "stop")
    name, args = plan.split(text, True, complete) if plan is not None else (None, text)
    if name is None:  # no plan, or cut off before the function was chosen
        return {"role": "assistant", "content": text, "refusal": None}, finish_reason
    call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}
    return ({"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]},
            "tool_calls" if complete else finish_reason)


def call_id():
    return "call_" + uuid.uuid4().hex[:24]


class CallStream:
    """One streamed choice's tool call: its name and id once known, then the argument fragments."""

    def __init__(self, plan):
        self.plan, self.text, self.sent, self.named = plan, "", 0, False

    def piece(self, text, finish_reason):
        """More output -> (its delta: the call's id and name once known, then argument fragments; or None,
        the choice's finish_reason)."""
        self.text += text
        complete = finish_reason in ("eos", "stop")
        name, args = self.plan.split(self.text, finish_reason is not None, complete)
        if name is None:  # not chosen yet; cut off before it was: the text as content
            return ({"content": self.text} if finish_reason and self.text else None), finish_reason
        calls = [] if self.named else [{"index": 0, "id": call_id(), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]
        if len(args) > self.sent:
            calls.append({"index": 0, "function": {"arguments": args[self.sent:]}})
        self.named, self.sent = True, len(args)
        return ({"tool_calls": calls} if calls else None), "tool_calls" if complete else finish_reason


def tool_plan(body):
    """The request's tools and tool_choice -> a ToolPlan, or None (no call); 400 for what cannot be served."""
    tools, choice = body.get("tools") or [], body.get("tool_choice", "auto" if body.get("tools") else "none")
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"tools holds {len(tools)} functions; at most {MAX_TOOLS} are allowed")
    functions = {i: check_tool(t, i) for i, t in enumerate(tools)}  # index in tools -> function
    if not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
        raise invalid("tool_choice", f"tool_choice must be none, auto, required or {{\"type\": \"function\", "
                                     f"\"function\": {{\"name\": ...}}}}, got {choice!r:.80}")
    if choice == "none":
        return None
    if choice == "auto":
        raise invalid("tools", NO_PARSER)
    if not functions:
        raise invalid("tool_choice", "tool_choice asks for a call but no tools are given")
    if isinstance(choice, dict):
        wanted = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        functions = {i: f for i, f in functions.items() if f["name"] == wanted}
        if not functions:
            raise invalid("tool_choice", f"tool_choice names function {wanted!r}, which is not in tools")
    schemas = {i: f.get("parameters") or {"type": "object"} for i, f in functions.items()}
    names = tuple(f["name"] for f in functions.values())
    if len(functions) == 1:
        i, schema = next(iter(schemas.items()))
        constraint = make_constraint("json_schema", schema, f"tools[{i}].function.parameters")
    else:
        rules = [f'call{i}: {json.dumps(head(name))} args{i} "}}"\n'
                 f'args{i}: %json {json.dumps({**schema, "x-guidance": JSON_OPTIONS})}'
                 for i, (name, schema) in enumerate(zip(names, schemas.values()))]
        start = "start: " + " | ".join(f"call{i}" for i in range(len(functions)))
        constraint = make_constraint("grammar", "\n".join([start, *rules]), "tools")
    compile_constraint(constraint)  # now: a schema llguidance refuses is a 400 naming its field
    return ToolPlan(names, constraint)


def check_tool(tool, i):
    """tools[i] -> its function, checked: {"type": "function", "function": {"name", "parameters"?}}."""
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not NAME.match(function["name"]):
        raise invalid(f"tools[{i}]", f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}} '
                                     f"with a name of 1-64 letters, digits, _ or -")
    if not isinstance(function.get("parameters", {}), dict):
        raise invalid(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON schema object")
    return function
