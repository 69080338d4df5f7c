"""Text generation for our GPT: the command line (python inference.py --ckpt PATH --prompt TEXT [flags])
and the Python API on top of the engine package (engine/, mapped in docs/design.md):

    model, info = load_model_from_checkpoint("out/dolly")   # also: stream_text, generate_batch, Engine
    generate_text(model, "Name three colours.", temperature=0.7, seed=1)   # {"text", "finish_reason", ...}

The Python API checks everything before work starts (ParamError, a ValueError naming the field).
"""

import argparse
import sys

from cli import CLIParser, bounded, run_cli
from engine.sampling_params import MAX_STOP_STRINGS, PARAM_RANGES


def build_parser():
    p = CLIParser(description="Generate text with a gpt2-instruct model (our ckpt.pt, an HF GPT-2 folder, or gpt2).",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt, a folder holding it, an HF GPT-2 folder, or gpt2")
    p.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw); '-' reads stdin")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the instruction template")
    for name, spec in PARAM_RANGES.items():  # every numeric sampling parameter of the table
        if spec["type"] in ("int", "float"):
            hi = "" if spec["max"] is None else f", at most {spec['max']}"
            bound = f"{'above' if spec.get('min_exclusive') else 'at least'} {spec['min']}{hi}"
            p.add_argument("--" + name.replace("_", "-"), type=int if spec["type"] == "int" else float,
                           default=spec["default"], help=f"{spec['help']} ({bound})")
    p.add_argument("--stop", action="append", default=None,
                   help=f"stop string; repeat for several (at most {MAX_STOP_STRINGS}); not included in the output")
    p.add_argument("--ignore-eos", action="store_true", help=PARAM_RANGES["ignore_eos"]["help"])
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="a JSON schema (.json file) the output must follow (compact JSON)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic int8 Linears (CPU)")
    p.add_argument("--threads", type=bounded(int, 1), default=None,
                   help="CPU threads for torch (None: torch's choice)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for the decode steps (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (slow first call, faster decoding)")
    p.add_argument("--prefill-chunk", type=bounded(int, 1), default=None,
                   help="prompt tokens computed per engine step (None: 8192 on CUDA, 512 elsewhere)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV-cache of prompt prefixes seen before")
    p.add_argument("--prefix-cache-mb", type=bounded(int, 0), default=None,
                   help="prefix cache pool in MiB (None: as large as the KV-cache)")
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")
    return p


if __name__ == "__main__":  # torch takes about 2 s to import (below): --help and a mistyped flag answer first
    run_cli(build_parser().parse_args)

import time  # noqa: E402

import torch  # noqa: E402

from common import UserError, parse_json  # noqa: E402
from engine.detokenizer import StopFilter, encode_prompt, utf8_decoder  # noqa: E402, F401
from engine.llm_engine import Engine  # noqa: E402
from engine.loader import (InOutLinear, TiedEmbedding, load_model_from_checkpoint, prepare_model,  # noqa: E402, F401
                           quantize_int8, use_in_out_layout)
from engine.sampler import TOPK_CANDIDATES, param_row, sample, sampler_kind  # noqa: E402, F401
from engine.sampling_params import (ParamError, SamplingParams,  # noqa: E402, F401
                                    check_ids, check_prompt_text, fit, validate_params)
from grammar import compile_constraint, make_constraint  # noqa: E402


def requests(engine, prompts, params):
    """Validate everything, then add."""
    p = SamplingParams.make(params)
    ids = [encode_prompt(prompt, p.raw) for prompt in prompts]  # valid ids, never empty
    for x in ids:
        fit(len(x), p, engine.config.block_size)
    return [engine.add(x, p) for x in ids]


def outputs(engine, requests):
    """Step the engine until the requests are done; yields their Outputs."""
    mine = {r.id for r in requests}
    while not all(r.done for r in requests):
        yield from (o for o in engine.step() if o.request_id in mine)


def own_engine(model, rows):
    """model itself if it is an Engine nobody else steps; else a fresh Engine with `rows` slots."""
    return model if isinstance(model, Engine) else Engine(model, max_batch=max(1, rows))


def generate_batch(model, prompts, **params):
    """Generate for a list of prompts together (an Engine or a model) -> one result dict per prompt.

    result: {"text", "finish_reason": "eos"|"stop"|"length"|"cancelled", "prompt_tokens",
    "completion_tokens", "token_ids"}. completion_tokens counts every generated token, including a
    final <|endoftext|> and the token that completed a stop string; text excludes both.
    """
    engine = own_engine(model, len(prompts))
    reqs = requests(engine, prompts, params)
    results = {r.id: {"text": "", "token_ids": []} for r in reqs}
    for o in outputs(engine, reqs):
        res = results[o.request_id]
        res["text"] += o.text
        res["token_ids"] += o.token_ids
        if o.finish_reason is not None:
            res.update(finish_reason=o.finish_reason, **o.usage)
    return list(results.values())


def generate_text(model, prompt, **params):
    """Generate a completion for one prompt; parameters as validate_params. See generate_batch."""
    return generate_batch(model, [prompt], **params)[0]


def stream_text(model, prompt, **params):
    """An iterator of the generated text in pieces: never a broken UTF-8 character, never any part
    of a stop string. Parameters as generate_text; they are checked at the call (ParamError)."""
    engine = own_engine(model, 1)
    reqs = requests(engine, [prompt], params)
    return (o.text for o in outputs(engine, reqs) if o.text)


def schema_constraint(path):
    """--json-schema FILE -> its compiled grammar.Constraint; a bad file or schema is a one-line UserError."""
    where = f"--json-schema {path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{where}: {e.strerror or e}") from None
    constraint = make_constraint("json_schema", parse_json(data, where, dict), where)
    compile_constraint(constraint)  # ConstraintError (a UserError): "--json-schema FILE: what is wrong"
    return constraint


def main(argv=None):
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:  # fail fast, before loading the model
        flags = {name: getattr(args, name) for name in PARAM_RANGES if hasattr(args, name)}  # the sampling flags
        flags["constraint"] = schema_constraint(args.json_schema) if args.json_schema else None
        params = SamplingParams.make(flags)
        check_prompt_text(prompt, params.raw, raw_flag="--raw")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, info = load_model_from_checkpoint(args.ckpt, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        engine = Engine(model, max_batch=1, prefill_chunk=args.prefill_chunk, graphs=args.graphs, compile=args.compile,
                        prefix_cache=args.prefix_cache, prefix_cache_mb=args.prefix_cache_mb)
        t0 = time.perf_counter()
        first, text, usage, reason = None, "", None, None
        for o in outputs(engine, requests(engine, [prompt], flags)):
            first = first or time.perf_counter()
            text += o.text
            if args.stream and o.text:
                print(o.text, end="", flush=True)
            usage, reason = o.usage or usage, o.finish_reason or reason
    except ValueError as e:
        raise UserError(str(e)) from None
    print("" if args.stream else text)
    if args.verbose:
        end = time.perf_counter()
        rate = (usage["completion_tokens"] - 1) / (end - first) if usage["completion_tokens"] > 1 else 0.0
        print(f"[{info['name']} on {info['device']} {info['dtype']}: finish_reason={reason} "
              f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} "
              f"prefill {(first - t0) * 1e3:.0f} ms, decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
