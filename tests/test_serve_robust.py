"""One client never starves the others, on a real socket with the engine in its own process: a
500-prompt request does not hold a newcomer back, loopback clients are never rate-limited by the
default limits, failed API-key attempts are."""

import json
import threading

import pytest

from test_serve_config import LiveServer, make_app, make_checkpoint, wait_until
from test_serve_live import open_request


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_robust"))


def test_a_newcomer_is_served_while_a_500_prompt_request_runs(ckpt):
    live = LiveServer(make_app(ckpt, max_batch=8, max_queue=600, log_level="warning"))
    try:
        big = {}
        # 8 tokens a prompt: the 500 take ~500 steps, so they still run when the newcomer arrives on a busy machine
        body = {"prompt": [f"item {i}" for i in range(500)], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        thread = threading.Thread(target=lambda: big.update(r=live.request("POST", "/v1/completions", body)))
        thread.start()
        assert wait_until(lambda: live.health()["queue"]["admitted"] == 500)  # each prompt counts against --max-queue
        f = open_request(live.port, "/generate", {"prompt": "hi", "max_new_tokens": 16, "ignore_eos": True,
                                                  "temperature": 0, "stream": True}).makefile("rb")
        assert f.readline().split()[1] == b"200"
        while not f.readline().startswith(b"data: "):
            pass
        assert thread.is_alive() and live.health()["queue"]["waiting"] > 100  # the 500 prompts are still queued
        events = [line for line in f.read().split(b"\n") if line.startswith(b"data: ")]
        assert json.loads(events[-1][6:])["usage"]["completion_tokens"] == 16
        thread.join(120)
        reply = json.loads(big["r"][2])
        assert big["r"][0] == 200 and len(reply["choices"]) == 500 and reply["usage"]["completion_tokens"] == 4000
    finally:
        live.close()


def test_limits_on_prompts_and_admission(ckpt):
    live = LiveServer(make_app(ckpt, max_queue=8, log_level="warning"))
    try:
        status, _, text = live.request("POST", "/v1/completions", {"prompt": ["a"] * 513, "max_tokens": 1})
        assert status == 400 and json.loads(text)["error"]["param"] == "prompt" and "512" in text
        status, _, text = live.request("POST", "/v1/completions", {"prompt": ["a"] * 3, "n": 3, "max_tokens": 1})
        assert status == 400 and "--max-queue" in json.loads(text)["error"]["message"]  # 9 generations never fit
    finally:
        live.close()


def test_default_limits_never_refuse_loopback_clients(ckpt):
    live = LiveServer(make_app(ckpt, rate_limit="30/minute;5/second", log_level="warning"))
    try:
        statuses = [live.request("POST", "/generate", {"prompt": "a", "max_new_tokens": 1})[0] for _ in range(40)]
        assert statuses == [200] * 40  # what lm-eval or a serving benchmark on this machine does
    finally:
        live.close()


def test_failed_api_key_attempts_are_rate_limited(ckpt):
    live = LiveServer(make_app(ckpt, api_key="right", auth_rate_limit="10/minute", log_level="warning"))
    try:
        body = {"prompt": "a", "max_new_tokens": 1}
        wrong = [live.request("POST", "/generate", body, {"Authorization": "Bearer wrong"}) for _ in range(12)]
        assert [s for s, _, _ in wrong] == [401] * 10 + [429] * 2
        assert json.loads(wrong[-1][2])["error"]["type"] == "rate_limit_exceeded" and int(wrong[-1][1]["Retry-After"]) > 0
        assert live.request("POST", "/generate", body, {"Authorization": "Bearer right"})[0] == 200
    finally:
        live.close()
