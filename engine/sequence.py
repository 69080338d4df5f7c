"""A request's state: its prompt, parameters and choices; and what a step emits for a choice (Output)."""

import itertools
import random
import secrets
from dataclasses import dataclass, field

from engine.detokenizer import StopFilter, token_bytes, utf8_decoder
from engine.sampling_params import SEED_MAX, SamplingParams
from grammar import Matcher, compile_constraint
from tokenizer import EOT_ID


@dataclass
class Output:
    """What one step produced for one choice of a request (plain data: it crosses the server's pipe)."""
    request_id: int
    index: int  # the choice
    text: str = ""  # new text: UTF-8 safe, stop strings held back
    token_ids: list = field(default_factory=list)  # new ids
    logprobs: list = None  # per new id {"token_id", "logprob", "top": [(id, logprob), ...]} if asked
    prompt_logprobs: "PromptLogprobs" = None  # echo: on the first Output
    finish_reason: str = None  # None while running; else "eos", "stop", "length" or "cancelled"
    usage: dict = None  # when finished: {"prompt_tokens", "completion_tokens"}


@dataclass
class PromptLogprobs:
    """Echo: the prompt's logprobs as numpy columns (a long prompt costs no per-token objects, in the engine
    or the server's pipe), a row per prompt token after the first, which has none."""
    logprob: "np.ndarray"  # (n - 1,) float32: raw log-probability of each prompt token
    top_ids: "np.ndarray"  # (n - 1, k) int64: the k best alternatives at its position, k = the request's logprobs
    top_logprobs: "np.ndarray"  # (n - 1, k) float32


class Request:
    """`n` choices of one prompt; group: requests of one group share the scheduler's fairness turn."""

    _ids = itertools.count(1 << 62)  # ids the caller did not choose: far from the ones it does

    def __init__(self, ids, params, n=1, logprobs=None, echo=False, request_id=None, group=None):
        assert isinstance(params, SamplingParams) and ids and 1 <= n and (params.max_new_tokens or echo)
        self.id = next(Request._ids) if request_id is None else request_id
        self.group = self.id if group is None else group
        self.prompt, self.params, self.n, self.logprobs, self.echo = ids, params, n, logprobs, bool(echo)
        template = compile_constraint(params.constraint) if params.constraint is not None else None  # cached
        self.choices = [Choice(self, i, template) for i in range(n)]
        self.cancelled = False  # set by Engine.cancel (any thread); the loop ends the choices
        self.filled = 0  # prompt tokens prefilled (or loaded from the prefix cache) so far
        self.match = None  # the cached prefix found at admission (prefix_cache.Match)
        self.prompt_lp = []  # echo: (logprob, top ids, top logprobs) device tensors, chunk by chunk

    @property
    def done(self):
        return all(c.finish_reason is not None for c in self.choices)


class Choice:
    """One sequence of a request: its slot, private RNG, grammar matcher (if constrained) and text assembly."""

    def __init__(self, request, index, template=None):
        p = request.params
        self.request, self.index, self.p = request, index, p
        seed = (p.seed + index) % (SEED_MAX + 1) if p.seed is not None else secrets.randbits(63)
        self.rng = random.Random(seed)  # private: one uniform per sampled token
        self.slot = None
        self.pos = 0  # host mirror of the slot's next cache position once decoding
        self.queued = 0  # tokens whose computation has been queued
        self.decoder = utf8_decoder()
        self.stops = StopFilter(p.stop)
        self.matcher = Matcher(template) if template is not None else None  # its own place in the grammar
        self.accepted = 0  # tokens the matcher has taken
        self.complete = False  # the grammar is complete (end-of-text is all it allows) or refused a token
        self.token_ids = []
        self.finish_reason = None
        self.out = None  # the Output of the current step

    def live(self):
        """Decoding and still owing tokens (as far as the host has queued)."""
        return self.finish_reason is None and self.slot is not None and 0 < self.queued < self.p.max_new_tokens

    def output(self, emitted):
        """This step's Output of the choice (the choice joins `emitted` on its first one)."""
        if self.out is None:
            self.out = Output(self.request.id, self.index, logprobs=[] if self.request.logprobs is not None else None)
            emitted.append(self)
        return self.out

    def advance(self, token):
        """The matcher takes the next generated id (the engine may do this before feed, to fill the next
        mask sooner). A refused id: only after a mask step ran out of llguidance's fuel, and then the mask
        allowed end-of-text alone."""
        if self.finish_reason is None and self.accepted == len(self.token_ids):
            self.accepted += 1
            self.complete = not self.matcher.accept(token) or self.matcher.done

    def feed(self, token, logprob, emitted):
        """One generated id (and its logprob entry or None); may finish the choice."""
        out = self.output(emitted)
        if self.matcher is not None:
            self.advance(token)
        self.token_ids.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
        if token == EOT_ID and not self.p.ignore_eos:
            return self.finish("eos", emitted)
        text, hit = self.stops.push(self.decoder.decode(token_bytes(token)))
        out.text += text
        if hit:
            self.finish_reason = "stop"
        elif self.complete:
            self.finish("stop", emitted)
        elif len(self.token_ids) >= self.p.max_new_tokens:
            self.finish("length", emitted)

    def finish(self, reason, emitted):
        """End the choice: flush the decoder and the held-back text (a stop string may still complete)."""
        out = self.output(emitted)
        text, hit = self.stops.push(self.decoder.decode(b"", final=True))
        out.text += text if hit else text + self.stops.flush()
        self.finish_reason = "stop" if hit else reason

    def take(self):
        """The Output of this step, completed (finish reason, usage); the next step starts a new one."""
        out, self.out = self.out, None
        out.finish_reason = self.finish_reason
        if self.finish_reason is not None:
            out.usage = {"prompt_tokens": len(self.request.prompt), "completion_tokens": len(self.token_ids)}
        return out
