"""A constraint on what a sequence may generate: a JSON schema, any JSON object, a regex, a choice among
strings, or a grammar (GBNF or Lark), enforced by llguidance (why llguidance, the API and the limits:
docs/design.md). Its parser runs under fuel limits: a hostile spec is bounded."""

import functools
import json
import re
import threading
import dataclasses
from dataclasses import dataclass

import llguidance
import llguidance.tiktoken
import torch
from llguidance.gbnf_to_lark import is_lark_syntax

from common import UserError
from tokenizer import EOT_ID, N_VOCAB, get_tokenizer

PADDED_VOCAB = 50304  # the model's logits width (model.py pads 50257 up to a multiple of 64)
MASK_WORDS = PADDED_VOCAB // 32  # one int32 word holds 32 token bits
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
CACHE_SIZE = 128  # compiled grammars kept; a template is small (the lexer grows lazily, bounded below)
MAX_SPEC_CHARS = 200_000  # a spec's canonical text; above it a 400 (a 20k-value enum fits)
MAX_GBNF_CHARS = 16_000  # GBNF is converted to Lark in Python, in time quadratic in its size (~1 s here)
COMPILE_STACK = 512 << 20  # bytes: llguidance recurses per rule; 8 MiB overflows at ~2500 chained rules
MAX_REPEAT = 10_000  # a counted repetition ({n,m}, ~ n..m): llguidance expands it, a{99999999} takes minutes
REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}|~\s*(\d+)(?:\s*\.\.\s*(\d+))?")
COMPILE_TIMEOUT = 10  # seconds; nested counts such as (a{400}){400} expand past the fuel checks (18 s)
_SLOTS = threading.BoundedSemaphore(2)  # compiles at once: one past the timeout still holds its slot
MAX_DEPTH = 64  # JSON nesting of a schema; real schemas stay under 10, the JSON compiler recurses
# characters of one literal (a schema's string, a choice, a quoted grammar terminal, a whole regex): a mask
# step inside a literal costs its length squared (5k: 20 ms, 50k: 2 s a token, holding every batch up)
MAX_LITERAL = 5_000
LITERALS = re.compile(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)*/')  # a grammar's "..." and /regex/ terminals
# Compact JSON, no free whitespace: a small model cannot wander into endless indentation.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(UserError):
    """A constraint the request got wrong; `field` names it (the server's 400 `param`)."""
    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    spec: str  # canonical text: sorted-key JSON for a schema or the choices, else the regex or grammar
    field: str = dataclasses.field(compare=False)  # named in errors; not in the compile cache's key

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


@dataclass(frozen=True)
class Form:
    """One request form of a constraint (FORMS lists them all)."""
    field: str  # where the spec sits: "a.b" is body["a"]["b"]
    kind: str
    value: tuple  # the JSON types the spec may have
    when: tuple = ()  # the discriminator that selects this form: (its field, its value)


FORMS = (
    Form("response_format.json_schema.schema", "json_schema", (dict,), ("response_format.type", "json_schema")),
    Form("response_format", "json_object", (dict,), ("response_format.type", "json_object")),
    Form("text.format.schema", "json_schema", (dict,), ("text.format.type", "json_schema")),
    Form("text.format", "json_object", (dict,), ("text.format.type", "json_object")),
    Form("structured_outputs.json", "json_schema", (dict, str)),
    Form("structured_outputs.json_object", "json_object", (bool,)),
    Form("structured_outputs.regex", "regex", (str,)),
    Form("structured_outputs.choice", "choice", (list,)),
    Form("structured_outputs.grammar", "grammar", (str,)),
    Form("guided_json", "json_schema", (dict, str)),
    Form("guided_regex", "regex", (str,)),
    Form("guided_choice", "choice", (list,)),
    Form("guided_grammar", "grammar", (str,)),
)
# The discriminators' allowed values: "text" means no constraint.
TYPES = dict.fromkeys(("response_format.type", "text.format.type"), ("text", "json_object", "json_schema"))
TYPE_NAMES = {dict: "an object", str: "a string", list: "an array", bool: "a boolean"}
_MISSING = object()


def _get(body, field):
    for key in field.split("."):
        if not isinstance(body, dict):
            raise ConstraintError(field.rsplit(".", 1)[0], "must be an object")
        body = body.get(key, _MISSING)
        if body is _MISSING or body is None:
            return _MISSING
    return body


def _selected(body, form):
    """The spec for this row of FORMS, _MISSING when the request does not use it."""
    if form.when:
        kind = _get(body, form.when[0])
        if kind is _MISSING and _get(body, form.when[0].rsplit(".", 1)[0]) is not _MISSING:
            raise ConstraintError(form.when[0], "required")
        if kind is not _MISSING and kind not in TYPES[form.when[0]]:
            raise ConstraintError(form.when[0], f"must be one of {', '.join(TYPES[form.when[0]])}, got {kind!r}")
        if kind != form.when[1]:
            return _MISSING
        if form.kind == "json_schema" and _get(body, form.field) is _MISSING:
            raise ConstraintError(form.field, "required when the type is json_schema")
    value = _get(body, form.field)
    if value is not _MISSING and not isinstance(value, form.value):
        raise ConstraintError(form.field, f"must be {' or '.join(TYPE_NAMES[t] for t in form.value)}")
    return _MISSING if value is False else value  # structured_outputs.json_object: false = none


def constraint_from_request(body):
    """The request's constraint (a Constraint) or None; at most one form may be used."""
    found = [(f, v) for f in FORMS if (v := _selected(body, f)) is not _MISSING]
    if len(found) > 1:
        raise ConstraintError(found[1][0].field, f"give one constraint, not both this and {found[0][0].field}")
    return make_constraint(found[0][0].kind, found[0][1], found[0][0].field) if found else None


def _check_json(value, field, level=0):
    if level > MAX_DEPTH:
        raise ConstraintError(field, f"nested deeper than {MAX_DEPTH} levels")
    children = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    _check_literals([value] if isinstance(value, str) else [], field)
    for child in children:
        _check_json(child, field, level + 1)


def _check_literals(texts, field):
    longest = max(map(len, texts), default=0)
    if longest > MAX_LITERAL:
        raise ConstraintError(field, f"a literal of {longest} characters is over the limit of {MAX_LITERAL}")


def make_constraint(kind, value, field):
    """A Constraint from one spec value (the CLI's --json-schema file comes here too)."""
    if kind == "json_object":
        value = {"type": "object"}
    if kind in ("json_schema", "json_object"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConstraintError(field, f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ConstraintError(field, "a JSON schema must be an object")
        _check_json(value, field)
        spec = json.dumps(value, sort_keys=True, separators=(",", ":"))
    elif kind == "choice":
        if not value or not all(isinstance(c, str) for c in value):
            raise ConstraintError(field, "must be a non-empty array of strings")
        _check_literals(value, field)
        spec = json.dumps(value)
    else:
        spec = value
        if not spec.strip():
            raise ConstraintError(field, "must not be empty")
        _check_literals([spec] if kind == "regex" else LITERALS.findall(spec), field)
    if len(spec) > MAX_SPEC_CHARS:
        raise ConstraintError(field, f"too large ({len(spec)} characters; the limit is {MAX_SPEC_CHARS})")
    counts = [int(n) for m in REPEAT.finditer(spec) for n in m.groups() if n]
    if counts and max(counts) > MAX_REPEAT:
        raise ConstraintError(field, f"a repetition count of {max(counts)} is over the limit of {MAX_REPEAT}")
    return Constraint(kind, spec, field)


@functools.lru_cache(maxsize=1)
def tokenizer_info():
    """llguidance's view of our tokenizer: GPT-2's ranks; the padding ids 50257.. are never allowed."""
    return llguidance.tiktoken.lltokenizer_from_encoding(get_tokenizer(), n_vocab=PADDED_VOCAB)


def _grammar(c):
    if c.kind in ("json_schema", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(c.spec, overrides=JSON_OPTIONS)
    if c.kind != "grammar":
        return llguidance.grammar_from(c.kind, c.spec)  # regex, choice
    if not is_lark_syntax(c.spec) and len(c.spec) > MAX_GBNF_CHARS:
        raise ConstraintError(c.field, f"a GBNF grammar is limited to {MAX_GBNF_CHARS} characters; "
                                       f"in Lark syntax to {MAX_SPEC_CHARS}")
    try:
        return llguidance.grammar_from("grammar", c.spec)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ConstraintError(c.field, str(e).splitlines()[0]) from None


def _build(c, result):
    # llguidance's default fuel bounds a hostile spec: ~20 ms of lexer building, ~15 ms a mask at worst
    limits = llguidance.LLParserLimits(verbose_errors=False)
    try:  # holds one of _SLOTS until done, even past COMPILE_TIMEOUT
        result.append(llguidance.LLMatcher(tokenizer_info(), _grammar(c), log_level=0, limits=limits))
    except (ConstraintError, ValueError, RuntimeError, RecursionError) as e:  # the front ends raise on bad specs
        result.append(e if isinstance(e, ConstraintError) else ConstraintError(c.field, _first_line(str(e))))
    finally:
        _SLOTS.release()


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile_constraint(c):
    """The template matcher of a constraint (cached): Matcher(template) starts a sequence on it."""
    result = []
    if not _SLOTS.acquire(timeout=COMPILE_TIMEOUT):
        raise ConstraintError(c.field, "not compiled: other grammars are still compiling; retry")
    old = threading.stack_size(COMPILE_STACK)  # a thread of its own: the grammar builder recurses
    try:
        worker = threading.Thread(target=_build, args=(c, result), name="grammar-compile", daemon=True)
        worker.start()
    finally:
        threading.stack_size(old)
    worker.join(COMPILE_TIMEOUT)
    if not result:  # it finishes in the background (the GIL released); the request gets its answer now
        raise ConstraintError(c.field, f"took over {COMPILE_TIMEOUT} s to compile; simplify it")
    if isinstance(m := result[0], ConstraintError):
        raise m
    bitmask = new_bitmask(1)
    m.unsafe_compute_mask_ptr(bitmask.data_ptr(), MASK_WORDS * 4)
    if m.is_error():
        raise ConstraintError(c.field, _first_line(m.get_error()))
    if not bitmask.any():
        raise ConstraintError(c.field, "no output satisfies it")
    return m


def _first_line(text):
    return " ".join(text.split())[:300] or "invalid"


class Matcher:
    """One sequence's place in its grammar. Not thread-safe: one sequence, one owner."""
    def __init__(self, template):
        self._m = template.deep_copy()

    def accept(self, token):
        """Advance by a sampled token; False when the grammar refused it (the matcher is then in error)."""
        return self._m.consume_token(int(token))

    @property
    def done(self):  # the grammar is complete: end-of-text is the only token left
        return self._m.is_stopped()


def new_bitmask(rows, pin=False):
    """An int32 [rows, MASK_WORDS] bitmask on the CPU (pinned: for a non_blocking copy to the GPU)."""
    return torch.zeros(rows, MASK_WORDS, dtype=torch.int32, pin_memory=pin)


@functools.lru_cache(maxsize=1)
def _executor():
    return llguidance.LLExecutor()  # a thread per core; fills rows in parallel, without the GIL


def fill_bitmask(matchers, bitmask, rows=None):
    """Row rows[i] (default i) of bitmask <- the tokens matchers[i] allows next; other rows untouched.
    A matcher in error allows end-of-text only, so a row is never empty. No torch op here: on a many-core
    host each small CPU op wakes torch's thread pool (one row's mask step: 275 us with them, 70 us without)."""
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
    rows = list(range(len(matchers))) if rows is None else list(rows)
    assert bitmask.shape[1] == MASK_WORDS and len(rows) == len(matchers) and max(rows, default=0) < len(bitmask)
    pairs = [(m._m, r) for m, r in zip(matchers, rows)]
    _executor().unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), MASK_WORDS * 4, bitmask.shape[0])
    words = bitmask.numpy()
    for m, r in pairs:
        if m.is_error():
            words[r] = 0
            words[r, EOT_ID // 32] = 1 << (EOT_ID % 32)


_BITS = {}  # device -> arange(32): created on first use, outside any CUDA-graph capture


def apply_bitmask(logits, bitmask):
    """logits with -inf where bit t of its row of bitmask is 0 (a new tensor; the raw logits stay for logprobs).
    logits: [B, V] float, N_VOCAB <= V <= 50304; bitmask: [B, MASK_WORDS] int32 on logits' device."""
    assert bitmask.dtype == torch.int32 and bitmask.device == logits.device and logits.dim() == 2
    if logits.device not in _BITS:
        _BITS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    V = logits.shape[1]
    assert N_VOCAB <= V <= PADDED_VOCAB and bitmask.shape[0] == logits.shape[0], (V, bitmask.shape)
    banned = ((bitmask.unsqueeze(-1) >> _BITS[logits.device]) & 1).view(bitmask.shape[0], -1)[:, :V] == 0
    return logits.masked_fill(banned, float("-inf"))
