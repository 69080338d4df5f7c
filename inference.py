"""Text generation for our GPT: the command line, and the Python API of the engine package.

    python inference.py --ckpt PATH --prompt TEXT [--stream] [--raw] [sampling flags]   (--help)

    from inference import load_model_from_checkpoint, generate_text, stream_text, generate_batch, Engine
    model, info = load_model_from_checkpoint("out/dolly")
    generate_text(model, "Name three colours.", temperature=0.7, seed=1)   # {"text", "finish_reason", ...}

The engine (continuous batching, one sampler, CUDA graphs) lives in engine/: docs/design.md maps it.
"""

import sys

from engine.cli import build_parser

if __name__ == "__main__":
    # torch takes about 2 s to import (below): the flags are read first, so that --help and a mistyped
    # flag answer at once
    build_parser().parse_args()

import time  # noqa: E402

import torch  # noqa: E402

from common import UserError, parse_json, run_cli  # noqa: E402
from engine.detokenizer import StopFilter, encode_prompt, utf8_decoder  # noqa: E402, F401
from engine.generate import generate_batch, generate_text, outputs, requests, stream_text  # noqa: E402, F401
from engine.llm_engine import Engine  # noqa: E402, F401
from engine.loader import (InOutLinear, TiedEmbedding, load_model_from_checkpoint, prepare_model,  # noqa: E402, F401
                           quantize_int8, use_in_out_layout)
from engine.sampler import TOPK_CANDIDATES, param_row, sample, sampler_kind  # noqa: E402, F401
from engine.sampling_params import (DEFAULTS, PARAM_RANGES, ParamError, SamplingParams,  # noqa: E402, F401
                                    check_ids, check_prompt_text, check_request, validate_params)
from engine.cli import sampling_flags  # noqa: E402
from grammar import compile_constraint, make_constraint  # noqa: E402


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
        flags = {**sampling_flags(args), "constraint": schema_constraint(args.json_schema) if args.json_schema else None}
        params = SamplingParams.make(flags)
        check_prompt_text(prompt, params.raw, raw_flag="--raw")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for name, lo in (("prefill_chunk", 1), ("prefix_cache_mb", 0)):
        if getattr(args, name) is not None and getattr(args, name) < lo:
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
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
