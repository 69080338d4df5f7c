"""Tool calls on /v1/chat/completions, made only when the request forces one (the model has no tool parser):
one function's arguments decode under its parameters schema; several, under a grammar that writes
{"name": ..., "arguments": ...}, as the chat history shows past calls (server/chat.py)."""

import json
import re
import uuid
from dataclasses import dataclass

from grammar import JSON_OPTIONS, compile_constraint, make_constraint
from server.config import invalid

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128
NO_PARSER = ("this model has no tool parser, so it cannot choose whether to call a tool (tool_choice 'auto', the "
             "default with tools): send tool_choice 'required' or {\"type\": \"function\", \"function\": {\"name\": "
             "...}} to force a call, or 'none'")


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

    def message(self, text, finish_reason):
        """A finished choice -> (its message, finish_reason)."""
        complete = finish_reason in ("eos", "stop")
        name, args = self.split(text, True, complete)
        if name is None:  # cut off before the function was chosen
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
    functions = [check_tool(t, i) for i, t in enumerate(tools)]
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
        if wanted not in [f["name"] for f in functions]:
            raise invalid("tool_choice", f"tool_choice names function {wanted!r}, which is not in tools")
        functions = [f for f in functions if f["name"] == wanted]
    if len(functions) == 1:
        i = next(i for i, t in enumerate(tools) if t["function"] is functions[0])
        return ToolPlan((functions[0]["name"],), compiled("json_schema", parameters(functions[0]),
                                                          f"tools[{i}].function.parameters"))
    rules = [f'call{i}: {json.dumps(head(f["name"]))} args{i} "}}"\n'
             f'args{i}: %json {json.dumps({**parameters(f), "x-guidance": JSON_OPTIONS})}'
             for i, f in enumerate(functions)]
    start = "start: " + " | ".join(f"call{i}" for i in range(len(functions)))
    return ToolPlan(tuple(f["name"] for f in functions), compiled("grammar", "\n".join([start, *rules]), "tools"))


def compiled(kind, spec, field):
    """A grammar.Constraint, compiled now: a schema llguidance refuses is a 400 naming its field."""
    constraint = make_constraint(kind, spec, field)
    compile_constraint(constraint)
    return constraint


def parameters(function):
    return function.get("parameters") or {"type": "object"}


def check_tool(tool, i):
    """tools[i] -> its function, checked: {"type": "function", "function": {"name", "parameters"?}}."""
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not NAME.match(function["name"]):
        raise invalid(f"tools[{i}]", f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}} '
                                     f"with a name of 1-64 letters, digits, _ or -")
    if not isinstance(function.get("parameters", {}), dict):
        raise invalid(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON schema object")
    return function
