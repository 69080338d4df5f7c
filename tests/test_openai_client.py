"""The official `openai` client against a live `python serve.py`: errors, logprobs, n, echo, token prompts,
/tokenize. Reference log-probabilities come from one fp32 forward pass of the same checkpoint."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Literal

import openai
import pydantic
import pytest
import torch

import tokenizer
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import ROOT, tiny_config
from model import GPT
from prompt import format_prompt

MODEL = "tiny-openai"
TEXT = "Hello there, naïve café 😀 — 日本語 and   spaces."


def make_checkpoint(folder, block_size=256):
    """A tiny random GPT saved as our sft checkpoint -> (path, the model in fp32 eval mode)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=block_size)).eval()
    path = save_checkpoint(os.path.join(folder, "ckpt.pt"), kind="sft", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=0)
    return path, model_from_checkpoint(load_checkpoint(path)).eval()


@contextlib.contextmanager
def serve_py(ckpt, log_path):
    """`python serve.py` as a user starts it, on a free loopback port (--port 0; it logs the URL it bound).
    Yields that URL once /health is ok; stops the server after."""
    cmd = [sys.executable, "serve.py", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", "0",
           "--rate-limit", "none", "--model-name", MODEL]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # the model loads in the background; busy machines are slow
        while True:
            output = open(log_path).read()
            assert proc.poll() is None, f"serve.py exited with {proc.returncode}:\n{output}"
            bound = re.search(r"http://127\.0\.0\.1:\d+", output)
            if bound and healthy(bound.group(0)):
                break
            assert time.monotonic() < deadline, f"serve.py never became healthy:\n{output}"
            time.sleep(0.2)
        yield bound.group(0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url, body):
    """-> (status, JSON body): a plain HTTP client for the routes the openai client does not know."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def healthy(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # refused while starting, 503 while loading
        return False


def reference_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one fp32 forward pass of the whole sequence.

    Over GPT-2's 50257 tokens: the embedding's padding rows past them are not tokens (as in the HF export)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits[0, :-1, :tokenizer.N_VOCAB].float(), dim=-1)
    return logp.gather(1, x[0, 1:, None])[:, 0].tolist()


def close(got, expected, tol):
    assert len(got) == len(expected)
    assert max(abs(g - e) for g, e in zip(got, expected)) <= tol, (got, expected)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(client, base URL, reference model)."""
    tmp = tmp_path_factory.mktemp("openai_client")
    ckpt, model = make_checkpoint(tmp)
    with serve_py(ckpt, tmp / "serve.log") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), url, model


# ---------------------------------------------------------------------- errors

INVALID = [  # (route, fields, the `param` the error names)
    ("completions", {"temperature": 9}, "temperature"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"max_tokens": -1}, "max_tokens"),
    ("completions", {"max_tokens": 100_000}, "max_tokens"),  # longer than the model's context
    ("completions", {"logprobs": 6}, "logprobs"),  # 0..5 on completions
    ("completions", {"n": 9}, "n"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"logit_bias": {"50": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"60000": 1}}, "logit_bias"),  # no such token
    ("completions", {"seed": "abc"}, "seed"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ("completions", {"prompt": [60000]}, "prompt"),  # token id past the vocabulary
    ("completions", {"prompt": [[1, 2], [-1]]}, "prompt"),
    ("completions", {"extra_body": {"min_p": 1.5}}, "min_p"),
    ("completions", {"extra_body": {"top_k": -3}}, "top_k"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # 0..20 on chat
    ("chat", {"n": 0}, "n"),
    ("chat", {"temperature": -1}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": ""}]}, "messages"),  # an empty last user message
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
]


@pytest.mark.parametrize("route, fields, param", INVALID, ids=[f"{r}-{json.dumps(f)}" for r, f, _ in INVALID])
def test_invalid_fields_are_bad_requests(live, route, fields, param):
    client = live[0]
    with pytest.raises(openai.BadRequestError) as e:
        if route == "completions":
            client.completions.create(**{"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
        else:
            messages = [{"role": "user", "content": "Hi"}]
            client.chat.completions.create(**{"model": MODEL, "messages": messages, "max_tokens": 2, **fields})
    err = e.value
    assert err.status_code == 400 and err.type == "invalid_request_error", err.body
    assert err.param and err.param.startswith(param), err.body  # "messages[0].content" names messages too
    if param != "messages":  # those messages name the message at fault ("the last user message ...")
        assert param in err.message, err.message  # the message names the field (and its range)


# ---------------------------------------------------------------------- logprobs

def test_completion_logprobs_shape_streamed_and_not(live):
    client = live[0]
    args = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=3)
    done = client.completions.create(**args)
    choice = done.choices[0]
    lp = choice.logprobs
    n = len(lp.tokens)
    assert n == done.usage.completion_tokens > 0
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert isinstance(token, str) and logprob <= 0
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values())
        assert abs(max(top.values()) - logprob) <= 1e-5  # greedy: the chosen token is the most likely one
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))

    tokens, logprobs, tops, text = [], [], [], ""
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
                tops += c.logprobs.top_logprobs
    assert text == choice.text and tokens == lp.tokens and tops and len(tops) == n
    close(logprobs, lp.token_logprobs, 1e-5)


def chat_token_ids(content):
    """Chat logprobs carry each token's UTF-8 bytes; in byte-level BPE those name the token exactly."""
    enc = tokenizer.get_tokenizer()
    return [enc.encode_single_token(bytes(c.bytes)) for c in content]


def test_chat_logprobs_shape_streamed_and_not(live):
    client, _, model = live
    user = "Give me a word."
    args = dict(model=MODEL, messages=[{"role": "user", "content": user}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2)
    done = client.chat.completions.create(**args)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens > 0
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token and abs(c.top_logprobs[0].logprob - c.logprob) <= 1e-5
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    ids = tokenizer.encode(format_prompt(user))
    gen = chat_token_ids(content)
    close([c.logprob for c in content], reference_logprobs(model, ids + gen)[len(ids) - 1:], 1e-4)

    streamed = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed += c.logprobs.content
    assert [c.token for c in streamed] == [c.token for c in content]
    close([c.logprob for c in streamed], [c.logprob for c in content], 1e-5)


def test_logprobs_are_raw_before_temperature_and_top_k(live):
    """Sampled at temperature 1.7 among the top 5, yet each logprob is log_softmax of the raw logits."""
    client, _, model = live
    user = "Tell a story."
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": user}], max_tokens=8,
                                          temperature=1.7, seed=5, logprobs=True, extra_body={"top_k": 5})
    content = done.choices[0].logprobs.content
    ids = tokenizer.encode(format_prompt(user))
    close([c.logprob for c in content], reference_logprobs(model, ids + chat_token_ids(content))[len(ids) - 1:], 1e-4)


# ---------------------------------------------------------------------- n

@pytest.mark.parametrize("route", ["completions", "chat"])
def test_n_choices(live, route):
    client = live[0]

    def texts(**fields):
        if route == "completions":
            out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, **fields)
            return [c.text for c in sorted(out.choices, key=lambda c: c.index)], [c.index for c in out.choices]
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                             max_tokens=12, **fields)
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)], [c.index for c in out.choices]

    greedy, index = texts(n=3, temperature=0)
    assert sorted(index) == [0, 1, 2] and greedy[0] == greedy[1] == greedy[2]
    sampled, _ = texts(n=3, temperature=1.0, seed=123)
    assert len(set(sampled)) == 3  # each choice has its own seed stream
    assert texts(n=3, temperature=1.0, seed=123)[0] == sampled  # and reproduces
    assert texts(n=1, temperature=1.0, seed=124)[0] == sampled[1:2]  # choice i samples with seed + i


# ---------------------------------------------------------------------- echo and prompts

def test_echo_with_max_tokens_0_gives_the_forward_pass_logprobs(live):
    client, _, model = live
    a, b = tokenizer.encode(TEXT), tokenizer.encode("A second, shorter prompt.")
    out = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 0
    for ids, choice in zip([a, b], out.choices):
        lp = choice.logprobs
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and lp.tokens[0] == tokenizer.decode(ids[:1])
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        close(lp.token_logprobs[1:], reference_logprobs(model, ids), 1e-4)

    # what lm-evaluation-harness sends: echo, max_tokens 1, logprobs 1; the prompt part is unchanged
    one = client.completions.create(model=MODEL, prompt=[a], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = one.choices[0].logprobs
    assert len(lp.token_logprobs) == len(a) + 1
    close(lp.token_logprobs[1:len(a)], out.choices[0].logprobs.token_logprobs[1:], 1e-5)


def test_token_id_prompt_equals_its_text(live):
    client = live[0]
    args = dict(model=MODEL, max_tokens=8, temperature=0)
    by_text = client.completions.create(prompt=TEXT, **args)
    by_ids = client.completions.create(prompt=tokenizer.encode(TEXT), **args)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(tokenizer.encode(TEXT))

    other = "Another prompt"
    both = client.completions.create(prompt=[TEXT, other], **args)  # one choice per prompt, in order
    alone = client.completions.create(prompt=other, **args)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [by_text.choices[0].text, alone.choices[0].text]


def test_tokenize_round_trip(live):
    url = live[1]
    for text in [TEXT, "  leading and trailing  ", "emoji 👩‍👩‍👧 and CJK 中文文本", "\n\n\ttabs"]:
        status, body = post(url + "/tokenize", {"model": MODEL, "prompt": text})
        assert status == 200 and body["tokens"] == tokenizer.encode(text), body
        assert body["count"] == len(body["tokens"])
        status, back = post(url + "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
        assert status == 200 and back["prompt"] == text, back
    status, bad = post(url + "/detokenize", {"tokens": [60000]})
    assert status == 400 and bad["error"]["param"] == "tokens", bad


# ---------------------------------------------------------------------- parse, responses, tools
# Every value is bounded (enums, booleans, short strings): a random model under a schema must still finish.

class City(pydantic.BaseModel):
    name: Literal["Paris", "Oslo", "Lima"]
    capital: bool
    nickname: str = pydantic.Field(max_length=8)


class Add(pydantic.BaseModel):
    a: Literal[1, 2, 3]
    b: Literal[1, 2, 3]


def test_chat_parse_with_a_pydantic_model(live):
    client = live[0]
    done = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city?"}],
                                         response_format=City, max_tokens=64, temperature=0)
    message = done.choices[0].message
    assert isinstance(message.parsed, City) and City.model_validate_json(message.content) == message.parsed


def test_responses_create_streamed_and_not(live):
    client = live[0]
    args = dict(model=MODEL, input="Name a colour.", instructions="One word.", max_output_tokens=8, temperature=0)
    done = client.responses.create(**args)
    assert done.object == "response" and done.status in ("completed", "incomplete") and done.output_text
    assert done.usage.output_tokens <= 8 and done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    events = list(client.responses.create(**args, stream=True))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added"]
    assert events[-1].type == f"response.{done.status}" and events[-1].response.output_text == done.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == done.output_text
    # text.format json_schema: the output validates
    city = client.responses.parse(model=MODEL, input="A city?", text_format=City, max_output_tokens=64, temperature=0)
    assert isinstance(city.output_parsed, City)


def test_named_and_required_tool_calls_validate(live):
    client = live[0]
    tools = [openai.pydantic_function_tool(City), openai.pydantic_function_tool(Add)]
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    done = client.chat.completions.parse(model=MODEL, messages=messages, tools=tools, max_tokens=64, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "Add"}})
    (call,) = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and call.function.name == "Add" and call.id
    assert isinstance(call.function.parsed_arguments, Add)
    # "required" with two tools, streamed: one call, its name first, then its arguments in pieces
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                                max_tokens=64, temperature=1.0, seed=4, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
                call["arguments"] += delta.function.arguments or ""
    (call,) = calls.values()
    assert finish == "tool_calls" and call["id"] and call["name"] in ("City", "Add")
    {"City": City, "Add": Add}[call["name"]].model_validate_json(call["arguments"])
    with pytest.raises(openai.BadRequestError) as e:  # auto (the default with tools): no tool parser
        client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=4)
    assert e.value.param == "tools" and "tool parser" in e.value.message


# ---------------------------------------------------------------------- structured output

def test_response_format_json_schema_and_json_object(live):
    """The SDK's response_format, strict and not, on chat; guided_regex (vLLM's form) on completions."""
    client = live[0]
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
              "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]}, "rank": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 9}}}
    messages = [{"role": "user", "content": "Pick a city."}]
    for strict in (True, False):
        fmt = {"type": "json_schema", "json_schema": {"name": "pick", "strict": strict, "schema": schema}}
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, n=2, temperature=1.0,
                                             seed=1, response_format=fmt)
        for c in out.choices:
            value = json.loads(c.message.content)
            assert c.finish_reason == "stop" and set(value) == {"city", "rank"} and 1 <= value["rank"] <= 9
            assert value["city"] in ("Oslo", "Lima", "Pune")
    # any object: unbounded, so a random model may write until max_tokens; a bias on "}" (92) and '"}' (20662)
    # makes it close early, wherever the grammar lets it
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=1.0, seed=3,
                                         n=4, response_format={"type": "json_object"},
                                         logit_bias={"92": 8, "20662": 8})
    closed = [json.loads(c.message.content) for c in out.choices if c.finish_reason == "stop"]
    assert closed and all(isinstance(v, dict) for v in closed)
    assert all(c.message.content.startswith("{") for c in out.choices)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Code:", max_tokens=20, stream=True, extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"}))
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3,
                                                                           "maximum": 1}}})
    assert e.value.param == "response_format.json_schema.schema" and "Unsatisfiable" in e.value.message
