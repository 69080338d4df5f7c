"""schemathesis drives a live serve.py from its own /openapi.json, with valid and invalid requests to every route:
no response is a 5xx, and every error is a JSON body."""

import json

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from test_openai_client import make_checkpoint, serve_py

# Requests per route and per mode (valid, invalid): a few hundred in all, quick even on busy cores.
# Fixed seeds (derandomize) so a failure reproduces; no shrinking: every problem is collected and listed.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def problem(case, response):
    """None if the response is fine, else one line saying what is wrong with it."""
    request = f"{case.method} {case.formatted_path} body={case.body!r:.200}"
    if response.status_code >= 500:
        return f"{request} -> {response.status_code} {response.text[:200]}"
    if response.status_code >= 400:
        try:
            error = json.loads(response.text)["error"]
            assert isinstance(error["message"], str) and error["type"]
            assert response.headers["content-type"][0].startswith("application/json")  # lowercase keys, lists
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{request} -> {response.status_code} not a JSON error: {response.text[:200]!r}"
    return None


def test_no_server_errors_and_every_error_is_json(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, block_size=32)  # a short context bounds every generation
    problems, calls, routes = [], [], set()
    with serve_py(ckpt, tmp_path / "serve.log") as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        schema.config.update(base_url=url)
        for operation in schema.get_all_operations():
            operation = operation.ok()
            routes.add(f"{operation.method.upper()} {operation.path}")
            for mode in GenerationMode:
                @SETTINGS
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case):
                    response = case.call(timeout=60)
                    calls.append(response.status_code)
                    if (found := problem(case, response)) is not None:
                        problems.append(found)

                try:
                    run()
                except Unsatisfiable:  # no invalid request exists for a route without parameters or body
                    assert mode == GenerationMode.NEGATIVE, operation.path
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= routes, routes
    assert len(calls) >= 5 * len(routes)  # the examples really went out
    assert not problems, "\n".join(problems[:20])
