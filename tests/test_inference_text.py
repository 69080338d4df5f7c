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

    Follows model.GPT's cache protocol: a row's position is its cache slot minus its left padding;
    eager calls advance kv_cache.pos.
    """

    def __init__(self, prompt_len, script, block_size=128):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.anchor = nn.Parameter(torch.zeros(1))  # device / dtype for the engine
        self.prompt_len, self.script = prompt_len, list(script)

    def forward(self, idx, targets=None, kv_cache=None, input_pos=None):
        B, T = idx.shape
        if kv_cache is None:
            slots = torch.arange(T)
        elif input_pos is not None:
            slots = input_pos
        else:
            slots = torch.arange(kv_cache.pos, kv_cache.pos + T)
            kv_cache.pos += T
        pad = kv_cache.pad if kv_cache is not None and kv_cache.pad is not None else torch.zeros(B, dtype=torch.long)
        step = slots.view(1, T) - pad.view(B, 1) - (self.prompt_len - 1)  # (B, T) index of the next token
        table = torch.tensor(self.script + [EOT_ID])
        nxt = table[step.clamp(0, len(self.script))]
        logits = torch.full((B, T, self.config.vocab_size), -1e4)
        logits.scatter_(2, nxt.unsqueeze(-1), 0.0)
        return logits, None


def scripted(text, prompt="Q", mode="eager", **engine):
    model = ScriptedLM(len(encode(prompt)), encode(text))
    if mode == "pipelined":  # static mode, next chunk queued before the current one is read
        mode, engine = "static", dict(engine, pipeline=True)
    inf.configure_engine(model, mode=mode, **engine)
    return model


def run_both(model, prompt="Q", **kw):
    """(non-streamed result, streamed pieces) with the same parameters."""
    kw = dict(dict(raw=True, max_new_tokens=60, temperature=0), **kw)
    result = inf.generate_text(model, prompt, **kw)
    pieces = list(inf.stream_text(model, prompt, **kw))
    assert "".join(pieces) == result["text"]
    return result, pieces


def token_texts(text):
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in encode(text)]


MODES = pytest.mark.parametrize("mode", ["eager", "static", "pipelined"])


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


@MODES
def test_stop_string_across_token_boundaries(mode):
    text = "The answer is 42. Next question"
    stop = "is 4"
    assert not any(stop in t for t in token_texts(text)), "the stop string must span tokens"
    model = scripted(text, mode=mode, chunk=3, bucket=16)
    result, pieces = run_both(model, stop=[stop])
    assert result["text"] == "The answer " and result["finish_reason"] == "stop"
    assert not any("is" in p for p in pieces)  # held back, then dropped: nothing of it leaked
    ids = encode(text)
    assert result["completion_tokens"] == 4 and decode(ids[:4]).endswith("is 42")  # up to the completing token


@MODES
def test_first_completed_stop_string_wins_and_str_is_accepted(mode):
    model = scripted("The answer is 42. Next", mode=mode, chunk=2, bucket=16)
    result, _ = run_both(model, stop=["42.", "answer"])
    assert result["text"] == "The " and result["finish_reason"] == "stop"
    result, _ = run_both(model, stop="42")
    assert result["text"] == "The answer is "


@MODES
def test_partial_stop_is_released_when_it_does_not_complete(mode):
    model = scripted("a ## b ### c", mode=mode)
    result, pieces = run_both(model, stop=["###"])
    assert result["text"] == "a ## b " and result["finish_reason"] == "stop"
    model = scripted("hello world", mode=mode)
    result, pieces = run_both(model, stop=["worldwide"])
    assert result["text"] == "hello world" and result["finish_reason"] == "eos"


@MODES
def test_stream_never_emits_broken_utf8(mode):
    text = "日本語 🙂 ok 🎉🎉 café"
    enc = get_tokenizer()
    partial = [t for t in encode(text) if not _is_valid_utf8(enc.decode_single_token_bytes(t))]
    assert len(partial) >= 6, "the script must contain tokens that are pieces of characters"
    model = scripted(text, mode=mode, chunk=4, bucket=16)
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


@MODES
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


@MODES
def test_batch_rows_with_their_own_stop_strings(mode):
    model = scripted("The answer is 42. Next question", mode=mode, chunk=2, bucket=16)
    rows = inf.generate_batch(model, ["Q", "Q", "Q"], stop=[["is 4"], None, ["Next"]], max_new_tokens=[60, 60, 3],
                              temperature=[0, 0.7, 0], seed=1, raw=True)
    assert [r["text"] for r in rows] == ["The answer ", "The answer is 42. Next question", "The answer is"]
    assert [r["finish_reason"] for r in rows] == ["stop", "eos", "length"]
