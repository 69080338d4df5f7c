"""
Prefill speed, to choose the engine's per-step token budget (prefill_chunk) per device kind and to see
whether a captured or compiled prefill forward pays.

    python bench/prefill.py                      # GPU: random GPT-2 124M, bf16, 2-4 minutes
    python bench/prefill.py --device cpu --model tiny --budgets 64,512 --prompts 4 --prompt-tokens 100

1. engine: for each budget B, inference.Engine(model, max_batch=--prompts, prefill_chunk=B): --prompts prompts
   of --prompt-tokens random ids, 1 new token each, added at once and stepped until idle -> prompt tokens/s;
   and a lone prompt's time from add() to its first token. The prefix cache is off (every prompt is new).
2. forward: the prefill forward alone (model.hidden into a KVCache at the engine's attention backends, then the
   last position's logits) for the (prompts x width) batch each budget makes: eager, replayed from a CUDA
   graph, torch.compile'd (dynamic=False).
Medians of --repeats, the device synchronized. Prints a table; the last line is JSON.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from torch.nn.attention import sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import inference  # noqa: E402
from common import run_cli  # noqa: E402
from device import pick_device, pick_dtype  # noqa: E402
from engine.model_runner import ATTENTION  # noqa: E402
from model import GPT, PRETRAINED_CONFIGS, GPTConfig, KVCache, pack  # noqa: E402

# random weights (the speed does not depend on them): GPT-2's four sizes, and a CPU smoke size
MODELS = {**PRETRAINED_CONFIGS, "tiny": dict(n_layer=2, n_head=4, n_embd=64)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--budgets", default="1024,4096,8192,16384,32768", help="prefill_chunk values, comma-separated")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--modes", default=None, help="forward modes: eager, graph, compile (default: all on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of fn(), the device synchronized around each call."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def random_ids(n, rng):
    """n random token ids, none of them end-of-text."""
    return [rng.randrange(1000, 50000) for _ in range(n)]


def engine_budget(model, device, budget, args):
    engine = inference.Engine(model, max_batch=args.prompts, prefill_chunk=budget, prefix_cache=False)
    params = inference.validate_params(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    rng = random.Random(budget)  # every prompt made before the clock starts (32k ids take ~15 ms in Python)
    prompts = iter([random_ids(args.prompt_tokens, rng) for _ in range(4 * args.prompts + args.repeats)])

    def run(n):
        for _ in range(n):
            engine.add(next(prompts), params)
        while engine.has_work():
            engine.step()

    run(args.prompts)  # untimed: kernels chosen, memory allocated
    batch, lone = timed(lambda: run(args.prompts), device, 3), timed(lambda: run(1), device, args.repeats)
    return {"budget": budget, "prompt_tokens_per_s": round(args.prompts * args.prompt_tokens / batch),
            "lone_first_token_ms": round(lone * 1e3, 2)}


def prefill_forward(model, cache, idx, packed, last):
    return model.lm_head(model.hidden(idx, cache=cache, packed=packed)[0, last])  # new prompts, as the engine


def replayer(fn, device):
    """fn() captured in a CUDA graph after a warm-up on a side stream -> its replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def forward_modes(model, device, dtype, B, T, modes, repeats):
    """Prompt tokens/s of one prefill forward of B prompts x T tokens in each mode (None: failed, noted)."""
    cache = KVCache(model.config, B, device=device, dtype=dtype)
    upload = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    idx, packed = pack([(random_ids(T, random.Random(b)), b, 0) for b in range(B)], model.config.block_size, upload)
    last = torch.arange(T - 1, B * T, T, device=device)  # each prompt's last token
    out = {"prompts": B, "width": T}
    for mode in modes:
        fn = torch.compile(prefill_forward, dynamic=False) if mode == "compile" else prefill_forward
        step = lambda fn=fn: fn(model, cache, idx, packed, last)  # noqa: E731
        try:
            with sdpa_kernel(ATTENTION):
                step = replayer(step, device) if mode == "graph" else step
                step()
                out[mode] = round(B * T / timed(step, device, repeats))
        except Exception as e:  # a mode this torch or device cannot run is reported, not fatal
            out[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return out


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model]))
    inference.prepare_model(model, device, dtype)
    modes = (args.modes or ("eager,graph,compile" if device.type == "cuda" else "eager")).split(",")
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "config": vars(args), "engine": [], "forward": []}
    print(f"{'budget':>7} {'prompt tok/s':>13} {'lone first token ms':>20}")
    for budget in args.budgets:
        r = engine_budget(model, device, budget, args)
        res["engine"].append(r)
        print(f"{budget:>7} {r['prompt_tokens_per_s']:>13,} {r['lone_first_token_ms']:>20}")
    print(f"\nprefill forward, prompt tokens/s\n{'prompts x width':>16} " + " ".join(f"{m:>12}" for m in modes))
    for budget in args.budgets:
        T = min(args.prompt_tokens, budget)
        r = forward_modes(model, device, dtype, max(1, min(args.prompts, budget // T)), T, modes, args.repeats)
        res["forward"].append(r)
        print(f"{r['prompts']:>7} x {T:<7} " + " ".join(f"{str(r[m])[:12]:>12}" for m in modes))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    run_cli(main)
