"""Text out of token ids, a token at a time: UTF-8 assembly and stop strings; and the prompt template in."""

import codecs
import functools

from engine.sampling_params import ParamError
from prompt import format_prompt
from tokenizer import EOT_ID, encode, get_tokenizer


def encode_prompt(prompt, raw=False):
    """Prompt text -> token ids: the instruction template (prompt.format_prompt) unless raw. An empty raw
    prompt becomes [<|endoftext|>], the start-of-document token GPT-2 was trained on."""
    if not isinstance(prompt, str):
        raise ParamError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    ids = encode(prompt if raw else format_prompt(prompt))
    return ids or [EOT_ID]


class StopFilter:
    """Cuts text at the first stop string, holding back any tail that could still start one (a proper
    prefix of a stop string), so a match never starts inside text already emitted. push(text) -> (text
    safe to emit, hit); once hit, everything from the stop string on is dropped."""

    def __init__(self, stops=()):
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text):
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        # the stop string that completes first (as if text came a character at a time) wins
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)[1]], True
        hold = self._held_tail(buf)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def _held_tail(self, buf):
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def utf8_decoder():
    """Incremental UTF-8 decoder: holds back the bytes of an unfinished character, replaces invalid ones."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@functools.lru_cache(maxsize=None)
def token_bytes(token):
    return get_tokenizer().decode_single_token_bytes(token)
