"""Sampling parameters: one typed record whose fields carry their own range, default and help, read by
validation (SamplingParams.make), the CLI flags, /params and OpenAPI (PARAM_RANGES); and the checks of a
whole request, run once at the edge (HTTP body, CLI flags, the Python API): the engine only asserts."""

import dataclasses
import math
from dataclasses import dataclass, field, fields

from tokenizer import N_VOCAB

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token
GREEDY_BELOW = 1e-4  # temperatures under this are greedy: dividing by them would overflow float32
SEED_MAX = 2**63 - 1


class ParamError(ValueError):
    """An invalid request field; `param` names it as the caller spelled it (the server's 400 `param`)."""
    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


def _p(default, help, lo=None, hi=None, **extra):
    """A field with its allowed range ("max": None = limited by the model's context) and help."""
    limits = {"min": lo, "max": hi} if lo is not None else {}
    return field(default=default, metadata={**limits, "help": help, **extra})


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; build it with SamplingParams.make (validated), then it is trusted."""

    max_new_tokens: int = _p(128, "most tokens to generate (0 only with echo); prompt tokens + max_new_tokens "
                                  "<= the model's block_size", 0, None)
    temperature: float = _p(0.8, f"0 (or under {GREEDY_BELOW}) = greedy, always the most likely token", 0.0, 2.0)
    top_k: int = _p(50, "sample from the k most likely tokens; 0 = no limit", 0, N_VOCAB)
    top_p: float = _p(1.0, "nucleus sampling: the smallest set of tokens with this much probability; 1 = off",
                      0.0, 1.0, min_exclusive=True)
    min_p: float = _p(0.0, "drop tokens less likely than min_p times the most likely one; 0 = off", 0.0, 1.0)
    repetition_penalty: float = _p(1.0, "CTRL-style penalty on tokens already in the prompt or output; 1 = off",
                                   1.0, 2.0)
    presence_penalty: float = _p(0.0, "subtracted from the logit of every token already generated (OpenAI); "
                                      "0 = off", -2.0, 2.0)
    frequency_penalty: float = _p(0.0, "subtracted once per earlier occurrence in the output (OpenAI); 0 = off",
                                  -2.0, 2.0)
    logit_bias: dict = field(default_factory=dict, metadata={
        "min": -100.0, "max": 100.0, "max_items": MAX_LOGIT_BIAS,
        "help": "{token id: bias} added to the logits; -100 bans a token, 100 forces it"})
    stop: tuple = field(default=(), metadata={
        "max_items": MAX_STOP_STRINGS, "max_chars": MAX_STOP_CHARS,
        "help": "a string or a list of strings; generation ends before the first one (not included)"})
    seed: int = _p(None, "same seed and inputs give the same text (choice i of n uses seed + i); null = random",
                   0, SEED_MAX)
    raw: bool = _p(False, "send the prompt as is (base models) instead of the instruction template")
    ignore_eos: bool = _p(False, "keep generating after <|endoftext|> (benchmarks)")
    # a grammar.Constraint (JSON schema, regex, choice, grammar) from a request form, compiled at the edge;
    # not in the table below: the forms are grammar.FORMS
    constraint: object = field(default=None, metadata={"help": "the output's grammar"})

    @property
    def greedy(self):
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def make(cls, values=None, names=None, **kwargs):
        """Validated parameters from a dict and/or keywords; unknown or bad values raise ParamError.
        names: {field: the caller's name for it} (an OpenAI client says max_tokens), used in messages."""
        values = {**(values or {}), **kwargs}
        names = names or {}
        out = {"constraint": values.pop("constraint", None)}  # checked where it is made (grammar.py)
        for name, value in values.items():
            f = FIELDS.get(name)
            if f is None:
                raise ParamError(name, f"unknown generation parameter {name!r}; known: {', '.join(FIELDS)}")
            if value is not None or PARAM_RANGES[name]["default"] is not None:  # null = the default
                out[name] = _check(names.get(name, name), value, PARAM_RANGES[name])
        return cls(**out)


FIELDS = {f.name: f for f in fields(SamplingParams) if f.name != "constraint"}
KINDS = {int: "int", float: "float", bool: "bool", dict: "bias", tuple: "stop"}
# the published table (server /params, OpenAPI, CLI help, the chat page): type, min, max, default, help
PARAM_RANGES = {f.name: {"type": KINDS[f.type], "default": None if f.type in (dict, tuple) else f.default,
                        **f.metadata} for f in FIELDS.values()}


def short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(name, value, spec):
    kind = spec["type"]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(name, f"{name} must be true or false ({spec['help']}), got {short(value)}")
        return value
    return {"int": _check_number, "float": _check_number, "stop": _check_stop, "bias": _check_bias}[kind](
        name, value, spec)


def _check_number(name, value, spec):
    """An int or float within its range; returns it as int or float."""
    lo, hi, is_int = spec["min"], spec["max"], spec["type"] == "int"
    if is_int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():  # JSON may send 64.0
            value, ok = int(value), True
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if spec.get("min_exclusive") else value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in ({lo}, {hi}]" if spec.get("min_exclusive") else \
            f"between {lo} and {hi}"
        raise ParamError(name, f"{name} must be {'an integer' if is_int else 'a number'} {rng} ({spec['help']}), "
                               f"got {short(value)}")
    return int(value) if is_int else float(value)


def _check_stop(name, value, spec):
    """A string or a list of strings -> a tuple of unique non-empty strings."""
    items = [value] if isinstance(value, str) else value
    ok = isinstance(items, (list, tuple)) and len(items) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
    if not ok:
        raise ParamError(name, f"{name} must be a string or a list of at most {MAX_STOP_STRINGS} non-empty "
                               f"strings of at most {MAX_STOP_CHARS} characters each, got {short(value)}")
    return tuple(dict.fromkeys(items))


def _check_bias(name, value, spec):
    """{token id (int or its decimal string, as JSON keys are): bias} -> {int: float}."""
    msg = (f"{name} must map at most {MAX_LOGIT_BIAS} token ids (0 to {N_VOCAB - 1}) to numbers between "
           f"{spec['min']} and {spec['max']}")
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ParamError(name, f"{msg}, got {short(value)}")
    out = {}
    for key, bias in value.items():
        tok = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 7 else key
        ok = isinstance(tok, int) and not isinstance(tok, bool) and 0 <= tok < N_VOCAB
        ok = ok and isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
        if not ok or not spec["min"] <= bias <= spec["max"]:
            raise ParamError(name, f"{msg}, got {short(key)}: {short(bias)}")
        out[tok] = float(bias)
    return out


def validate_params(**params):  # the Python API's spelling
    return SamplingParams.make(params)


def check_ids(ids, name="prompt"):
    """A non-empty list of token ids of the tokenizer -> list of int; else ParamError(name)."""
    ok = isinstance(ids, (list, tuple)) and len(ids) > 0 and all(type(t) is int for t in ids) and (  # not bool
        0 <= min(ids) and max(ids) < N_VOCAB)
    if not ok:
        raise ParamError(name, f"{name} must be a non-empty list of token ids between 0 and {N_VOCAB - 1}, "
                               f"got {short(ids)}")
    return list(ids)


def fit(n_prompt, params, context, explicit=True, echo=False, limit=None, prompt_name="prompt", names=None):
    """The one context check: the prompt within `limit` (default context - 1, or context with echo and no
    new tokens), prompt + max_new_tokens within `context`. An explicit max_new_tokens that does not fit is
    a ParamError whose message says "... can be at most N ..."; an unspecified one is lowered -> params."""
    name = (names or {}).get("max_new_tokens", "max_new_tokens")
    if params.max_new_tokens == 0 and not echo:
        raise ParamError(name, f"{name} must be at least 1 (0 only with echo)")
    limit = min(limit or context, context - (params.max_new_tokens > 0 or not echo))
    if n_prompt > limit:
        raise ParamError(prompt_name, f"{prompt_name} is {n_prompt} tokens; the limit is {limit} tokens "
                                      f"(this model reads at most {context} tokens in all, its block_size)")
    room = context - n_prompt
    if params.max_new_tokens <= room:
        return params
    if explicit:
        raise ParamError(name, f"prompt ({n_prompt} tokens) + {name} ({params.max_new_tokens}) is more than the "
                               f"model's block_size {context}; {name} can be at most {room} for this prompt")
    return params.replace(max_new_tokens=room)


def check_inputs(inputs, context, name="input"):
    """Embedding inputs: non-empty id lists that fit the context; else ParamError."""
    for ids in inputs:
        if len(check_ids(ids, name)) > context:
            raise ParamError(name, f"{name} is {len(ids)} tokens; this model reads at most {context}")


def check_prompt_text(prompt, raw, raw_flag="raw: true"):
    """An instruction must say something; an empty prompt is for raw text (it starts from <|endoftext|>)."""
    if not raw and not prompt.strip():
        raise ParamError("prompt", f"prompt must not be empty (an empty prompt is allowed with {raw_flag})")
