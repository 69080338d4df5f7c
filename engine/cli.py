"""The flags of `python inference.py`, built from the parameter table; argparse only (no torch), so
--help and a mistyped flag answer before the model's libraries load."""

import argparse

from engine.sampling_params import MAX_STOP_STRINGS, PARAM_RANGES

NUMBERS = [name for name, spec in PARAM_RANGES.items() if spec["type"] in ("int", "float")]


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line on stderr and exit 2, as every other user mistake."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def flag_help(name):
    spec = PARAM_RANGES[name]
    hi = "" if spec["max"] is None else f", at most {spec['max']}"
    return f"{spec['help']} ({'above' if spec.get('min_exclusive') else 'at least'} {spec['min']}{hi})"


def build_parser():
    p = Parser(description="Generate text with a gpt2-instruct model (our ckpt.pt, an HF GPT-2 folder, or gpt2).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt, a folder holding it, an HF GPT-2 folder, or gpt2")
    p.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw); '-' reads stdin")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the instruction template")
    for name in NUMBERS:  # every numeric sampling parameter of the table
        kind = int if PARAM_RANGES[name]["type"] == "int" else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=PARAM_RANGES[name]["default"],
                       help=flag_help(name))
    p.add_argument("--stop", action="append", default=None,
                   help=f"stop string; repeat for several (at most {MAX_STOP_STRINGS}); not included in the output")
    p.add_argument("--ignore-eos", action="store_true", help=PARAM_RANGES["ignore_eos"]["help"])
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="a JSON schema (.json file) the output must follow (compact JSON)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic int8 Linears (CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: torch's choice)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for the decode steps (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (slow first call, faster decoding)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens computed per engine step (None: 8192 on CUDA, 512 elsewhere)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV-cache of prompt prefixes seen before")
    p.add_argument("--prefix-cache-mb", type=int, default=None,
                   help="prefix cache pool in MiB (None: as large as the KV-cache)")
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")
    return p


def sampling_flags(args):
    """The sampling parameters among parsed flags, as SamplingParams.make takes them."""
    return {name: getattr(args, name) for name in PARAM_RANGES if hasattr(args, name)}
