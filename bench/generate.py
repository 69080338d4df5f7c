"""
Generation speed: the inference.py Engine (ours) against transformers' GPT2LMHeadModel.generate on the
same weights, device and prompts (--prompt-len random token ids a row), greedy, --n-new tokens a row
(end-of-text ignored), in one run. A table, then a JSON line.

    python bench/generate.py                                   # GPU: GPT-2 124M random weights, B=1/8/32/64
    python bench/generate.py --device cpu --batch-sizes 1,8 --n-new 32             # CPU, a few minutes
    python bench/generate.py --json-schema nested --batch-sizes 32 --no-hf      # constrained against free

Ours: one Engine per mode (MODES), each batch added at once and stepped until idle after a warm-up run of the
same shape; best of --repeats. prefill ms = until every row has its first token; decode tok/s = rows x
(n_new - 1) / the rest. transformers: prefill from generate(max_new_tokens=1), decode from the difference to
the full run; its greedy tokens are compared with ours (row 0). --json-schema FILE (or "nested") also times
every row under the schema ("ours+json") and only the first ("ours+1json"); it must not complete early.
"""

import json
import os
import platform
import random
import sys
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import inference  # noqa: E402
from bench.prefill import MODELS, random_ids, sync  # noqa: E402
import grammar  # noqa: E402
from cli import CLIParser, DefaultsFormatter, UserError, bounded, run_cli  # noqa: E402
from device import pick_device, pick_dtype  # noqa: E402
from export_hf import hf_config  # noqa: E402
from model import GPT, GPT2_VOCAB, GPTConfig, ours_to_hf  # noqa: E402

TARGETS = {"cuda_batch1_decode": 2000, "cuda_batch32_decode": 30000, "cpu_batch1_vs_hf": 2.0,
           "cuda_batch32_constrained_vs_free": 0.8}  # decode tok/s; ratios of decode tok/s, of tok/s
# objects of nested objects, arrays, enums, bounded numbers and patterns; minItems keeps every row going
NESTED = {"type": "object", "required": ["rows"], "properties": {"rows": {"type": "array", "minItems": 64, "items": {
    "type": "object", "required": ["id", "name", "geo"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "name": {"type": "string", "maxLength": 12},
        "tag": {"enum": ["new", "sale", "old"]}, "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "geo": {"type": "object", "required": ["lat", "lon"], "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number"}}}}}}}}
MODES = {"eager": dict(graphs=False), "graphs": dict(graphs=True), "graphs+compile": dict(graphs=True, compile=True)}


def sizes(text):
    return [bounded(int, 1)(b) for b in text.split(",")]


def parse_args(argv):
    p = CLIParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="ours and transformers (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="ours only (CPU)")
    p.add_argument("--batch-sizes", type=sizes, default=None,
                   help="comma-separated (default: 1,8,32,64 on CUDA, 1,8 elsewhere)")
    p.add_argument("--n-new", type=bounded(int, 2), default=None,
                   help="new tokens a row (default 256 on CUDA, 32 on CPU)")
    p.add_argument("--prompt-len", type=bounded(int, 1), default=32)
    p.add_argument("--modes", default=None, help=f"ours' modes, comma-separated: {', '.join(MODES)} "
                                                 "(default: graphs,graphs+compile on CUDA, else eager)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (best is kept)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--json-schema", default=None, help='also time ours under this schema: a file, or "nested"')
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64 (a smoke test), not GPT-2 124M")
    args = p.parse_args(argv)
    if args.modes and not set(args.modes.split(",")) <= set(MODES):
        raise UserError(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    return args


def build_models(args, device, dtype):
    """(ours, hf or None, description). Both hold the same weights; ours may then be quantized."""
    torch.manual_seed(0)  # the speed depends on the shape, not the weights
    ours = GPT(GPTConfig(**MODELS["tiny" if args.tiny else "gpt2"])).eval().requires_grad_(False)
    name = "random tiny GPT" if args.tiny else "random GPT-2 124M"
    hf = None if args.no_hf else build_hf(ours, device, dtype)
    if args.quantize != "none" and (device.type != "cpu" or dtype != torch.float32):
        raise UserError("--quantize int8 needs --device cpu and float32")
    inference.prepare_model(ours, device, dtype, None if args.quantize == "none" else args.quantize)  # as loading does
    return ours, hf, name


def build_hf(ours, device, dtype):
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(ours.config)))  # as export_hf.py writes it
    missing, unexpected = hf.load_state_dict(ours_to_hf(ours.state_dict(), GPT2_VOCAB), strict=False)
    assert not unexpected and all(k.endswith(("lm_head.weight", "attn.bias", "attn.masked_bias")) for k in missing)
    hf.tie_weights()
    return hf.eval().to(device=device, dtype=dtype)


def load_schema(arg):
    """--json-schema -> (grammar.Constraint, compile ms of the new schema, first the tokenizer's table)."""
    grammar.tokenizer_info()  # once per process, not per schema
    t = time.perf_counter()
    if arg != "nested":
        return inference.schema_constraint(arg), (time.perf_counter() - t) * 1e3  # as inference.py reads it
    c = grammar.make_constraint("json_schema", NESTED, "--json-schema")
    grammar.compile_constraint(c)
    return c, (time.perf_counter() - t) * 1e3


def time_ours(engine, prompts, n_new, repeats, constraint=None, held=None):
    """Best (prefill_s, decode_s, total_s, token ids of row 0) over `repeats` runs after one warm-up run.
    held: how many rows (the first) decode under the constraint (default: all)."""
    free = inference.validate_params(max_new_tokens=n_new, temperature=0, ignore_eos=True)
    params = [inference.validate_params(max_new_tokens=n_new, temperature=0, ignore_eos=True, constraint=constraint)
              if constraint is not None and i < (held or len(prompts)) else free for i in range(len(prompts))]

    def once():
        sync(engine.device)
        t0 = time.perf_counter()
        reqs = [engine.add(x, p) for x, p in zip(prompts, params)]
        got, first = {r.id: [] for r in reqs}, None
        while engine.has_work():
            for o in engine.step():
                got[o.request_id] += o.token_ids
            if first is None and all(got.values()):
                first = time.perf_counter()
        end = time.perf_counter()
        if not all(len(t) == n_new for t in got.values()):
            raise UserError("every row must generate --n-new tokens (a schema must not complete before)")
        return first - t0, end - first, end - t0, got[reqs[0].id]

    once()  # warm-up: graph capture / compilation
    return min((once() for _ in range(repeats)), key=lambda run: run[2])


def time_hf(hf, prompts, n_new, repeats, device):
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=GPT2_VOCAB - 1)
        sync(device)
        return time.perf_counter() - t, out[0, ids.size(1):].tolist()

    run(2)  # warm-up
    first = min(run(1)[0] for _ in range(repeats))
    full, tokens = min((run(n_new) for _ in range(repeats)), key=lambda x: x[0])
    return first, max(full - first, 1e-9), full, tokens


def run_config(impl, mode, fn, B, prompt_len, n_new):
    try:
        prefill, decode, total, tokens = fn()
    except RuntimeError as e:  # one configuration failing (out of memory, capture) must not hide the others
        return {"impl": impl, "mode": mode, "batch": B,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}, None
    return {"impl": impl, "mode": mode, "batch": B, "tok_s": round(B * n_new / total, 1),
            "prefill_tok_s": round(B * prompt_len / prefill, 1), "decode_tok_s": round(B * (n_new - 1) / decode, 1),
            "prefill_ms": round(prefill * 1e3, 2), "decode_ms_per_step": round(decode / (n_new - 1) * 1e3, 3)}, tokens


def print_table(rows):
    head = (f"{'impl':<13}{'mode':<16}{'batch':>6}{'tok/s':>12}{'prefill ms':>12}{'decode tok/s':>14}{'ms/step':>10}"
            f"{'vs hf':>8}")
    print(f"\n{head}\n{'-' * len(head)}")
    hf = {r["batch"]: r.get("decode_tok_s") for r in rows if r["impl"] == "transformers"}
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<13}{r['mode']:<16}{r['batch']:>6}  {r['error']}")
            continue
        ratio = r["decode_tok_s"] / hf[r["batch"]] if hf.get(r["batch"]) else None
        r["decode_vs_hf"] = round(ratio, 2) if ratio else None
        print(f"{r['impl']:<13}{r['mode']:<16}{r['batch']:>6}{r['tok_s']:>12,.0f}{r['prefill_ms']:>12,.1f}"
              f"{r['decode_tok_s']:>14,.1f}{r['decode_ms_per_step']:>10.2f}{(f'{ratio:.1f}x' if ratio else ''):>8}")


def check_targets(rows, device, constrained):
    """TARGETS this device has figures for -> {name: {got, target, met}}."""
    best = {}
    for r in rows:
        if r["impl"] == "ours" and "error" not in r:
            best[r["batch"]] = max(best.get(r["batch"], 0), r["decode_tok_s"])
    hf1 = next((r["decode_tok_s"] for r in rows if r["impl"] == "transformers" and r["batch"] == 1
                and "error" not in r), None)
    b32 = [v for k, v in constrained.items() if k.endswith("/b32")]
    got = {"cuda_batch1_decode": best.get(1), "cuda_batch32_decode": best.get(32),
           "cuda_batch32_constrained_vs_free": max(b32, default=None)} if device.type == "cuda" else {}
    if device.type == "cpu" and 1 in best and hf1:
        got["cpu_batch1_vs_hf"] = round(best[1] / hf1, 2)
    return {k: {"got": v, "target": TARGETS[k], "met": v >= TARGETS[k]} for k, v in got.items() if v is not None}


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    n_new = args.n_new or (256 if device.type == "cuda" else 32)
    modes = (args.modes or ("graphs,graphs+compile" if device.type == "cuda" else "eager")).split(",")
    batch_sizes = args.batch_sizes or ([1, 8, 32, 64] if device.type == "cuda" else [1, 8])
    ours, hf, name = build_models(args, device, dtype)
    if args.prompt_len + n_new > ours.config.block_size:
        raise UserError(f"--prompt-len + --n-new must be <= block_size {ours.config.block_size}")
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    print(f"model: {name}; device: {device} ({hw}); dtype: {dtype}; quantize: {args.quantize}; "
          f"prompt {args.prompt_len} tokens, {n_new} new, greedy; torch {torch.__version__}")
    constraint, compile_ms = load_schema(args.json_schema) if args.json_schema else (None, None)
    rows, agree = [], {}
    # no prefix cache: the timed runs repeat the warm-up's prompts, and prefill is part of what is timed
    engines = {mode: inference.Engine(ours, max_batch=max(batch_sizes), prefill_chunk=512,
                                      prefix_cache=False, **MODES[mode]) for mode in modes}
    for B in batch_sizes:
        rng = random.Random(0)
        prompts = [random_ids(args.prompt_len, rng) for _ in range(B)]
        shape, hf_tokens = (B, args.prompt_len, n_new), None
        if hf is not None:
            row, hf_tokens = run_config("transformers", "generate", partial(time_hf, hf, prompts, n_new, args.repeats,
                                                                            device), *shape)
            rows.append(row)
        for mode, engine in engines.items():
            timed = partial(time_ours, engine, prompts, n_new, args.repeats)
            row, tokens = run_config("ours", mode, timed, *shape)
            rows.append({**row, "engine_notes": engine.notes[:]})
            if tokens is not None and hf_tokens is not None:
                agree[f"{mode}/b{B}"] = len(os.path.commonprefix([tokens, hf_tokens]))
            if constraint is not None:
                rows.append(run_config("ours+json", mode, partial(timed, constraint), *shape)[0])
            if constraint is not None and B > 1:  # one constrained row among free ones: the batch's pace
                rows.append(run_config("ours+1json", mode, partial(timed, constraint, 1), *shape)[0])
    report(rows, agree, device, {"bench": "generate", "model": name, "device": str(device), "hardware": hw,
                                 "dtype": str(dtype).replace("torch.", ""), "quantize": args.quantize, "n_new": n_new,
                                 "prompt_len": args.prompt_len, "torch": torch.__version__,
                                 "transformers": getattr(sys.modules.get("transformers"), "__version__", None),
                                 "threads": torch.get_num_threads()}, compile_ms)
    return 0


def report(rows, agree, device, run, compile_ms):
    """The table, the greedy agreement, the constrained ratios and targets, then the JSON line."""
    print_table(rows)
    print(f"\ngreedy tokens shared with transformers (row 0, of {run['n_new']}): {agree}")
    free = {(r["mode"], r["batch"]): r["tok_s"] for r in rows if r["impl"] == "ours" and "error" not in r}
    ratios, mixed = ({f"{r['mode']}/b{r['batch']}": round(r["tok_s"] / free[r["mode"], r["batch"]], 3) for r in rows
                      if r["impl"] == impl and "error" not in r and (r["mode"], r["batch"]) in free}
                     for impl in ("ours+json", "ours+1json"))
    if compile_ms is not None:
        print(f"\nschema compile: {compile_ms:.1f} ms; constrained tok/s / free tok/s: {ratios}; "
              f"one constrained row among free ones, the batch's tok/s / free tok/s: {mixed}")
    targets = check_targets(rows, device, ratios)
    for key, t in targets.items():
        print(f"target {key}: {t['got']:,} vs {t['target']:,} -> {'met' if t['met'] else 'NOT met'}")
    grammar_run = None if compile_ms is None else {"compile_ms": round(compile_ms, 2), "constrained_vs_free": ratios,
                                                   "one_constrained_vs_free": mixed}
    print(json.dumps({**run, "results": rows, "greedy_prefix_match": agree, "targets": targets,
                      "grammar": grammar_run}))


if __name__ == "__main__":
    run_cli(main)
