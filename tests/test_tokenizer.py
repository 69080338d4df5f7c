import tiktoken

from tokenizer import EOT_ID, N_VOCAB, decode, encode, get_tokenizer


def test_hello_world_ids():
    assert encode("Hello world") == [15496, 995]


def test_vocab_and_special_token():
    enc = get_tokenizer()
    assert enc.n_vocab == N_VOCAB == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert decode([EOT_ID]) == "<|endoftext|>"


def test_user_text_never_becomes_the_special_token():
    assert EOT_ID not in encode("a <|endoftext|> b")


def test_unicode_round_trip():
    text = "Emoji 😀🎉👩‍👩‍👧, CJK 漢字かなカナ한국어, accents café naïve, tabs\tand\nnewlines  "
    ids = encode(text)
    assert all(0 <= i < N_VOCAB for i in ids)
    assert decode(ids) == text


def test_never_touches_the_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr("tiktoken.load.read_file", no_network)
    get_tokenizer.cache_clear()
    try:
        assert encode("offline") == get_tokenizer().encode_ordinary("offline")
    finally:
        get_tokenizer.cache_clear()
