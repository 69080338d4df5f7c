"""Request bodies: each route's fields in one table. A field is a JSON Schema (checked here) or the sampling
parameter it feeds (checked by SamplingParams.make). `only` marks OpenAI fields accepted at a no-op value.
The tables also build the OpenAPI document (/openapi.json)."""

import json
import math

import orjson
from flask import request

from engine.sampling_params import PARAM_RANGES, ParamError, SamplingParams, check_ids
from grammar import FORMS, TYPES, compile_constraint, constraint_from_request
from server.chat import MAX_TOOLS, NAME, ROLES
from server.config import HTTP_TYPES, ApiError, invalid, short

MAX_N = 8  # choices per request (n): they share one prefill
MAX_PROMPTS = 512  # prompts in one /v1/completions request (each prompt x n also counts against --max-queue)
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
STRING_OR_IDS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                           {"type": "array", "minItems": 1,
                            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}}]}

MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"], "properties": {
        "role": {"enum": list(ROLES)}, "name": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]},
        "tool_calls": {"type": "array", "items": {"type": "object", "properties": {"function": {
            "type": "object", "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}},
        "tool_call_id": {"type": "string"}}}}
FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": NAME.pattern}, "description": {"type": "string"},
    "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
JSON_NAMES = {dict: "object", str: "string", list: "array", bool: "boolean"}


def param_schema(name):
    """The JSON Schema of one engine parameter, from PARAM_RANGES."""
    spec = PARAM_RANGES[name]
    if name == "stop":
        schema = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                 "maxItems": spec.get("max_items", 4)}]}
    elif spec["type"] == "bias":
        schema = {"type": "object", "maxProperties": spec["max_items"],
                  "additionalProperties": {"type": "number", "minimum": spec["min"], "maximum": spec["max"]}}
    else:
        schema = {"type": {"int": "integer", "float": "number", "bool": "boolean"}.get(spec["type"], "string")}
        if spec.get("min") is not None:
            schema["exclusiveMinimum" if spec.get("min_exclusive") else "minimum"] = spec["min"]
        if spec.get("max") is not None:
            schema["maximum"] = spec["max"]
    if spec.get("default") is not None:
        schema["default"] = spec["default"]
    return {**schema, "description": spec.get("help", "")}


def F(schema=None, param=None, only=None, why=None, **extra):
    """One field of a route table."""
    return {"schema": schema or {}, "param": param, "only": only, "why": why, **extra}


def T(kind, description="", **bounds):
    return F({"type": kind, "description": description, **bounds})


def constraint_fields():
    """The route fields of the constraint forms (grammar.FORMS), nested as the requests nest them;
    text.format is the Responses API's and not here."""
    fields = {}
    for form in FORMS:
        types = [{"type": JSON_NAMES[t]} for t in form.value]
        leaves = [(form.field, types[0] if len(types) == 1 else {"anyOf": types})]
        leaves += [(form.when[0], {"enum": list(TYPES[form.when[0]])})] if form.when else []
        for path, leaf in leaves:
            top, *rest = path.split(".")
            if top == "text":
                continue
            node = fields.setdefault(top, {"description": "a constraint on the output (docs/design.md)"})
            for key in rest:
                node.update(type="object")
                node = node.setdefault("properties", {}).setdefault(key, {})
            node.update(leaf)
    return {name: F(schema) for name, schema in fields.items()}


CONSTRAINT_FIELDS = constraint_fields()
SAMPLING = [name for name in PARAM_RANGES if name not in ("max_new_tokens", "raw")]
OPENAI_COMMON = {
    "model": T("string", "any id is accepted; replies carry this server's model name"),
    "max_tokens": F(param="max_new_tokens"),
    **{name: F(param=name) for name in SAMPLING},
    "n": T("integer", "choices to generate (they share one prefill)", minimum=1, maximum=MAX_N),
    "stream": T("boolean"),
    "stream_options": F({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    "user": T("string", "ignored"),
    "best_of": F({"type": "integer", "minimum": 1, "maximum": 1}, only=lambda v: v == 1,
                 why="best_of is not supported (only 1); use n for several choices"),
    **CONSTRAINT_FIELDS,
}

NATIVE_FIELDS = {
    "prompt": F({"type": "string", "description": "the instruction (with raw: true, the text to continue)"},
                required=True),
    "context": T("string", "fills the template's Input block"),
    "stream": T("boolean"),
    "logprobs": T("integer", "return each token's log-probability and this many alternatives", minimum=0,
                  maximum=20),
    **{name: F(param=name) for name in PARAM_RANGES},
    **CONSTRAINT_FIELDS,
}

COMPLETION_FIELDS = {
    **OPENAI_COMMON,
    "prompt": F(STRING_OR_IDS, required=True),
    "logprobs": T("integer", "log-probabilities of each token and this many alternatives", minimum=0, maximum=5),
    "echo": T("boolean", "return the prompt, with its logprobs, before the completion"),
    "suffix": F({"type": "string", "maxLength": 0}, only=lambda v: v == "", why="suffix is not supported"),
    "raw": F(param="raw"),
}

CHAT_FIELDS = {
    **OPENAI_COMMON,
    "messages": F(MESSAGES, required=True),
    "max_completion_tokens": F(param="max_new_tokens"),
    "logprobs": T("boolean"),
    "top_logprobs": T("integer", "alternatives per token (needs logprobs: true)", minimum=0, maximum=20),
    "tools": F({"type": "array", "maxItems": MAX_TOOLS, "items": {"type": "object", "required": ["type", "function"],
                "properties": {"type": {"enum": ["function"]}, "function": FUNCTION}}}),
    "tool_choice": F({"oneOf": [{"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"enum": ["function"]},
            "function": {"type": "object", "properties": {"name": {"type": "string"}}}}}],
        "description": "auto (the default with tools) is refused: the model has no tool parser"}),
    "functions": F({"type": "array", "maxItems": 0}, only=lambda v: not v, why="functions are not supported"),
    "function_call": F({"enum": ["none"]}, only=lambda v: v == "none", why="function_call must be 'none'"),
    "parallel_tool_calls": T("boolean", "ignored"),
}

RESPONSE_FIELDS = {
    "model": OPENAI_COMMON["model"],
    "input": F({"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]},
               required=True),
    "instructions": T("string", "a system message before the input"),
    "max_output_tokens": F(param="max_new_tokens"),
    **{name: F(param=name) for name in SAMPLING},
    "stream": T("boolean"),
    "text": F({"type": "object", "properties": {"format": {"type": "object", "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "name": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}}),
    "store": F({"type": "boolean"}, only=lambda v: not v, why="store: true is not supported: this server keeps no "
                                                              "responses; send store: false"),
    "previous_response_id": F({"type": "string"}, only=lambda v: False, why="previous_response_id is not supported "
                              "(no response is stored); send the whole conversation in input"),
    "metadata": F({"type": "object"}),
    "user": T("string", "ignored"),
    "parallel_tool_calls": T("boolean", "ignored"),
    "tools": F({"type": "array", "maxItems": 0}, only=lambda v: not v, why="tools are not supported on /v1/responses"),
    "tool_choice": F({"enum": ["none", "auto"]}),
}

TOKENIZE_FIELDS = {
    "model": T("string"),
    "prompt": T("string", "text to tokenize as is (with raw: false, in the instruction template)"),
    "content": T("string", "llama.cpp's name for prompt"),
    "messages": F(MESSAGES),
    "raw": T("boolean", "default true for prompt"),
    "add_special_tokens": T("boolean", "ignored: GPT-2 adds none"),
    "add_special": T("boolean", "ignored: GPT-2 adds none"),
    "return_token_strs": T("boolean"),
}

DETOKENIZE_FIELDS = {"model": T("string"), "tokens": F({"type": "array", "items": {"type": "integer", "minimum": 0}},
                                                       required=True)}

EMBEDDING_FIELDS = {
    "model": T("string"),
    "input": F(STRING_OR_IDS, required=True),
    "encoding_format": F({"enum": ["float", "base64"]}),
    "user": T("string", "ignored"),
    "dimensions": F({"type": "integer"}, only=lambda v: False, why="dimensions is not supported"),
}

def check_type(name, value, schema):
    """The top-level checks of a field's schema (type, enum, bounds, lengths); nested shapes are checked where used."""
    kind = schema.get("type")
    ok = kind is None or (isinstance(value, JSON_TYPES[kind]) and not (kind in ("integer", "number")
                                                                       and isinstance(value, bool)))
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise invalid(name, f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {short(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise invalid(name, f"{name} must be one of {', '.join(map(str, schema['enum']))}, got {short(value)}")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(name, f"{name} must be between {lo} and {hi}, got {short(value)}")
    return value


def read_body(table, route):
    """The JSON body checked against a route table -> (plain fields, engine params given, client names)."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"{route} takes a JSON body: send Content-Type: application/json")
    try:
        raw = request.get_data(cache=True)  # RequestEntityTooLarge past MAX_CONTENT_LENGTH
    except (TimeoutError, OSError):
        raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
    try:  # orjson: 15 us for 600 prompt ids, the stdlib 140 us. What it refuses (NaN, huge or deep numbers, lone
        body = orjson.loads(raw)  # surrogates, UTF-16) the stdlib parses below, or names what is wrong
    except orjson.JSONDecodeError:
        body = None
    try:
        if body is None:
            body = json.loads(raw, parse_constant=_refuse_number, parse_float=_finite_float, parse_int=_sane_int)
    except RecursionError:
        raise invalid(None, "the request body is nested too deeply", "invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(None, f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    unknown = sorted(set(body) - set(table))
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r} for {route}; allowed: {', '.join(sorted(table))}")
    for name, spec in table.items():
        if spec.get("required") and body.get(name) is None:
            raise invalid(name, f"{name} is required ({route})")
    plain, params, names = {}, {}, {}
    for name, value in body.items():
        spec = table[name]
        if value is None:
            continue  # null = the default, as OpenAI
        if spec["param"]:
            if spec["param"] in params:
                raise invalid(name, f"give {names[spec['param']]} or {name}, not both")
            params[spec["param"]], names[spec["param"]] = value, name
            continue
        if "type" in spec["schema"] or "enum" in spec["schema"]:
            value = check_type(name, value, spec["schema"])
        if spec["only"] is not None and not spec["only"](value):
            raise invalid(name, spec["why"])
        plain[name] = value
    return plain, params, names


def _refuse_number(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _sane_int(text):
    # past float range: no field takes it (and math on it overflows); len(text) first: this runs per prompt id
    if len(text) > 300 and len(text.lstrip("-")) > 300:
        raise ValueError(f"integer {text[:20]}... is out of range")
    return int(text)


def sampling_params(given, names, body, defaults=None):
    """SamplingParams from defaults + the given fields + the body's constraint (grammar.FORMS, compiled now so
    that a bad one is a 400 naming its field); a ParamError is a 400 in the client's words."""
    constraint = constraint_from_request(body)
    if constraint is not None:
        compile_constraint(constraint)  # cached; the engine's process compiles its own copy
    try:
        return SamplingParams.make({**(defaults or {}), **given, "constraint": constraint}, names=names)
    except ParamError:
        raise  # already in the client's words
    except (TypeError, ValueError, OverflowError, RecursionError) as e:  # a shape the checks did not expect
        raise invalid(None, f"invalid generation parameter: {e}") from None


def prompt_list(value, param):
    """A prompt field (string, list of strings, ids, list of id lists) -> list of str | list[int]."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and len(value) > MAX_PROMPTS and not all(type(v) is int for v in value):
        raise invalid(param, f"{param} holds {len(value)} prompts; one request takes at most {MAX_PROMPTS}")
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(type(v) is int for v in value):
            return [check_ids(value, param)]
        if all(isinstance(v, list) and v for v in value):
            return [check_ids(v, f"{param}[{i}]") for i, v in enumerate(value)]
    raise invalid(param, f"{param} must be a string, a list of strings, a list of token ids, or a list of "
                         f"token-id lists (none empty), got {short(value)}")


def openapi_document():
    """OpenAPI 3.1 for every route, the request bodies built from the route tables and PARAM_RANGES."""

    def body_schema(table):
        props = {}
        for name, spec in table.items():
            schema = param_schema(spec["param"]) if spec["param"] else dict(spec["schema"])
            props[name] = {"anyOf": [schema, {"type": "null"}]} if not spec.get("required") else schema
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n, s in table.items() if s.get("required")]}

    error = {"$ref": "#/components/schemas/Error"}
    errors = {str(code): {"description": kind, "content": {"application/json": {"schema": error}}}
              for code, kind in HTTP_TYPES.items()}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok_stream = {"description": "OK (JSON, or Server-Sent Events with stream: true)",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}

    def post(summary, table, ok=ok_json):
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": body_schema(table)}}}, "responses": {"200": ok, **errors}}}

    def get(summary, ok=ok_json, **parameters):
        return {"get": {"summary": summary, **parameters, "responses": {"200": ok, **errors}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt2-instruct", "version": "1", "description": (
            "Native and OpenAI-compatible generation. Logprobs are the model's raw log-probabilities (before "
            "temperature, top-k, top-p and penalties). With n > 1, choice i samples with seed + i when seed is "
            "given.")},
        "paths": {
            "/health": get("Readiness: 200 when the model is loaded, 503 while loading or shutting down"),
            "/params": get("Generation parameters: type, range, default; context length"),
            "/generate": post("Native generation (instruction template unless raw)", NATIVE_FIELDS, ok_stream),
            "/v1/completions": post("OpenAI text completion", COMPLETION_FIELDS, ok_stream),
            "/v1/chat/completions": post("OpenAI chat completion", CHAT_FIELDS, ok_stream),
            "/v1/responses": post("OpenAI Responses API (nothing is stored)", RESPONSE_FIELDS, ok_stream),
            "/v1/embeddings": post("Mean-pooled, L2-normalised final hidden states", EMBEDDING_FIELDS),
            "/tokenize": post("Text or chat -> token ids", TOKENIZE_FIELDS),
            "/detokenize": post("Token ids -> text", DETOKENIZE_FIELDS),
            "/v1/models": get("The served model"),
            "/v1/models/{model_id}": get("One model", parameters=[{"name": "model_id", "in": "path", "required": True,
                                                                   "schema": {"type": "string"}}]),
            "/metrics": get("Prometheus metrics", {"description": "OK", "content": {"text/plain": {
                "schema": {"type": "string"}}}}),
            "/openapi.json": get("This document"),
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["type", "message"], "properties": {
                "type": {"type": "string"}, "message": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}},
    }
