"""Text assembly in inference.py: stop strings across token boundaries, UTF-8-safe streaming, finish reasons.

A scripted model (logits we control) makes the engine emit exact token sequences through the real
decode loop, in eager and static modes, streamed and not.
"""

import pytest
import torch
from torch import nn

import inference as inf
from model import GPTConfig
from tokenizer import EOT_ID, decode, encode, get_tokenizer


class ScriptedLM(nn.Module):
    """Emits `script` after any prompt of `prompt_len` tokens, then <|endoftext|>.

    Speaks model.GPT's protocol: its "hidden state" is each token's position, lm_head turns a
    position into the scripted next token.
    """

    def __init__(self, prompt_len, script, block_size=128):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.anchor = nn.Parameter(torch.zeros(1))  # device / dtype for the engine
        self.prompt_len, self.table = prompt_len, torch.tensor(list(script) + [EOT_ID])

    def hidden(self, idx, cache=None, pos=None, slots=None, kv_len=None, packed=None):
        B, T = idx.shape
        if packed is not None:
            return packed.positions.view(1, T, 1)
        start = torch.zeros(B, dtype=torch.long) if pos is None else pos
        return (start.view(B, 1) + torch.arange(T)).unsqueeze(-1)  # (B, T, 1)

    def lm_head(self, h):
        step = (h.squeeze(-1) - (self.prompt_len - 1)).clamp(0, len(self.table) - 1)  # index of the next token
        logits = torch.full((*step.shape, self.config.vocab_size), -1e4)
        return logits.scatter_(-1, self.table[step].unsqueeze(-1), 0.0)

    def forward(self, idx, targets=None, **cache):
        return self.lm_head(self.hidden(idx, **cache)), None


MODES = {"eager": dict(), "static": dict(static=True), "pipelined": dict(static=True, pipeline=True)}


def scripted(text, prompt="Q", mode="eager", chunk=1):
    model = ScriptedLM(len(encode(prompt)), encode(text))
    return inf.Engine(model, max_batch=4, decode_chunk=chunk, **MODES[mode])


def run_both(engine, prompt="Q", **kw):
    """(non-streamed result, streamed pieces) with the same parameters."""
    kw = dict(dict(raw=True, max_new_tokens=60, temperature=0), **kw)
    result = inf.generate_text(engine, prompt, **kw)
    pieces = list(inf.stream_text(engine, prompt, **kw))
    assert "".join(pieces) == result["text"]
    return result, pieces


def token_texts(text):
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in encode(text)]


ALL_MODES = pytest.mark.parametrize("mode", list(MODES))


# ---------------------------------------------------------------- StopFilter and the UTF-8 decoder


def test_stop_filter_holds_back_possible_starts_and_releases_them():
    f = inf.StopFilter(["###"])
    assert f.push("Hello #") == ("Hello ", False)
    assert f.push("#") == ("", False)  # "##" could still become "###"
    assert f.push(" b") == ("## b", False)  # it did not: released
    assert f.push("##") == ("", False)
    assert f.push("#!") == ("", True)  # the stop string and everything after it is dropped
    f = inf.StopFilter(["worldwide"])
    assert f.push("hello world") == ("hello ", False)
    assert f.flush() == "world"  # the end of the text: nothing can match any more


def test_stop_filter_earliest_match_wins():
    f = inf.StopFilter(["cd", "bcde"])
    assert f.push("abcdef") == ("ab", True)
    f = inf.StopFilter(["xyz"])
    assert f.push("no stop here") == ("no stop here", False)


def test_incremental_utf8_decoder_never_splits_a_character():
    text = "naïve 日本語 🙂🎉 ok"
    dec = inf.utf8_decoder()
    pieces = [dec.decode(bytes([b])) for b in text.encode()] + [dec.decode(b"", final=True)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert all(p == "" or p.encode().decode() == p for p in pieces)


# ---------------------------------------------------------------- end to end through the engine


@ALL_MODES
def test_stop_string_across_token_boundaries(mode):
    text = "The answer is 42. Next question"
    stop = "is 4"
    assert not any(stop in t for t in token_texts(text)), "the stop string must span tokens"
    model = scripted(text, mode=mode, chunk=3)
    result, pieces = run_both(model, stop=[stop])
    assert result["text"] == "The answer " and result["finish_reason"] == "stop"
    assert not any("is" in p for p in pieces)  # held back, then dropped: nothing of it leaked
    ids = encode(text)
    assert result["completion_tokens"] == 4 and decode(ids[:4]).endswith("is 42")  # up to the completing token


@ALL_MODES
def test_first_completed_stop_string_wins_and_str_is_accepted(mode):
    model = scripted("The answer is 42. Next", mode=mode, chunk=2)
    result, _ = run_both(model, stop=["42.", "answer"])
    assert result["text"] == "The " and result["finish_reason"] == "stop"
    result, _ = run_both(model, stop="42")
    assert result["text"] == "The answer is "


@ALL_MODES
def test_partial_stop_is_released_when_it_does_not_complete(mode):
    model = scripted("a ## b ### c", mode=mode)
    result, pieces = run_both(model, stop=["###"])
    assert result["text"] == "a ## b " and result["finish_reason"] == "stop"
    model = scripted("hello world", mode=mode)
    result, pieces = run_both(model, stop=["worldwide"])
    assert result["text"] == "hello world" and result["finish_reason"] == "eos"


@ALL_MODES
def test_stream_never_emits_broken_utf8(mode):
    text = "日本語 🙂 ok 🎉🎉 café"
    enc = get_tokenizer()
    partial = [t for t in encode(text) if not _is_valid_utf8(enc.decode_single_token_bytes(t))]
    assert len(partial) >= 6, "the script must contain tokens that are pieces of characters"
    model = scripted(text, mode=mode, chunk=4)
    result, pieces = run_both(model)
    assert result["text"] == text and result["finish_reason"] == "eos"
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert result["completion_tokens"] == len(encode(text)) + 1  # + <|endoftext|>


def _is_valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@ALL_MODES
def test_stop_string_with_multibyte_characters(mode):
    model = scripted("日本語 🙂 ok", mode=mode)
    result, pieces = run_both(model, stop=["🙂"])
    assert result["text"] == "日本語 " and result["finish_reason"] == "stop"


def test_length_cut_inside_a_character_matches_decode():
    """A character left unfinished by max_new_tokens ends as U+FFFD, like tokenizer.decode."""
    ids = encode("🙂")
    assert len(ids) == 2
    model = scripted("🙂")
    result, pieces = run_both(model, max_new_tokens=1)
    assert result["finish_reason"] == "length" and result["text"] == decode(ids[:1]) == "\ufffd"


def test_eos_finish_and_usage():
    text = "Short answer."
    model = scripted(text, prompt="Tell me")
    result, _ = run_both(model, prompt="Tell me", max_new_tokens=50)
    assert result == {**result, "text": text, "finish_reason": "eos", "prompt_tokens": len(encode("Tell me")),
                      "completion_tokens": len(encode(text)) + 1}
    assert result["token_ids"] == encode(text) + [EOT_ID]
    result, _ = run_both(model, prompt="Tell me", max_new_tokens=2)
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 2
    assert result["text"] == decode(encode(text)[:2])


@ALL_MODES
def test_batch_rows_with_their_own_stop_strings(mode):
    engine = scripted("The answer is 42. Next question", mode=mode, chunk=2)
    rows = [dict(stop=["is 4"]), dict(temperature=0.7, seed=1), dict(stop=["Next"], max_new_tokens=3)]
    reqs = [engine.add(encode("Q"), inf.validate_params(**dict(dict(max_new_tokens=60, temperature=0), **kw)))
            for kw in rows]
    text, reasons = {}, {}
    while engine.has_work():
        for o in engine.step():
            text[o.request_id] = text.get(o.request_id, "") + o.text
            reasons[o.request_id] = o.finish_reason
    assert [text[r.id] for r in reqs] == ["The answer ", "The answer is 42. Next question", "The answer is"]
    assert [reasons[r.id] for r in reqs] == ["stop", "eos", "length"]
