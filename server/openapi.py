"""The OpenAPI 3.1 document of every route, its request bodies built from the route tables and the
sampling parameters' own fields."""

from server.config import HTTP_TYPES
from server.schema import (CHAT_FIELDS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, EMBEDDING_FIELDS, NATIVE_FIELDS,
                           RESPONSE_FIELDS, TOKENIZE_FIELDS, param_schema)


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
    errors = {str(code): {"description": HTTP_TYPES.get(code, "error"), "content": {"application/json": {"schema": error}}}
              for code in (400, 401, 404, 405, 408, 413, 415, 429, 503)}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok_stream = {"description": "OK (JSON, or Server-Sent Events with stream: true)",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}

    def post(summary, table, ok=ok_json):
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": body_schema(table)}}}, "responses": {"200": ok, **errors}}}

    def get(summary, ok=ok_json):
        return {"get": {"summary": summary, "responses": {"200": ok, **errors}}}

    model_param = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt2-instruct", "version": "1", "description": (
            "Native and OpenAI-compatible generation. Logprobs are the model's raw log-probabilities (before "
            "temperature, top-k, top-p and penalties). With n > 1, choice i samples with seed + i when seed is given.")},
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
            "/v1/models/{model_id}": {"get": {"summary": "One model", "parameters": model_param,
                                              "responses": {"200": ok_json, **errors}}},
            "/metrics": get("Prometheus metrics", {"description": "OK", "content": {"text/plain": {
                "schema": {"type": "string"}}}}),
            "/openapi.json": get("This document"),
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["type", "message"], "properties": {
                "type": {"type": "string"}, "message": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}},
    }
