"""bench/prefill.py and the prompt phases of bench/serve_load.py run on CPU with a tiny model and end with
their JSON line (speed is not checked: timings never go in tests)."""

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, ROOT + "/bench")

import prefill  # noqa: E402


def test_prefill_bench_smoke(capsys):
    assert prefill.main(["--device", "cpu", "--model", "tiny", "--budgets", "64,256", "--prompts", "2",
                         "--prompt-tokens", "40", "--repeats", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["budget"] for r in res["engine"]] == [64, 256] and res["engine"][0]["prompt_tokens_per_s"] > 0
    assert [(r["prompts"], r["width"]) for r in res["forward"]] == [(1, 40), (2, 40)] and res["forward"][1]["eager"] > 0


def test_serve_load_prompt_phases_smoke():
    out = subprocess.run([sys.executable, "bench/serve_load.py", "--model", "tiny", "--device", "cpu", "--turns", "2",
                          "--new-tokens", "2", "--rows", "1", "--shots", "2", "--duration", "0.5", "--warmup", "0",
                          "--workers", "2",  # two gunicorn workers, one engine: its prefix cache serves both
                          "--skip", "nonstream,stream,newcomer,embeddings,burst,cacheoff"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["cache_on"]["chat"]["ttft_ms_per_turn"]) == 2 and res["cache_on"]["loglik"]["errors"] == 0
    assert res["prefix_cache"]["hits"] > 0 and list(res["loglik_engine"]) == ["cache_on"]
    assert res["loglik_engine"]["cache_on"] > 0 and res["engine"]["tokens_per_s"] > 0
