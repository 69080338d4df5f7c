"""The GPT-2 tokenizer (BPE via tiktoken), built offline: tiktoken.get_encoding("gpt2") downloads its ranks;
this builds the identical encoding (same ranks, pattern and special token) from assets/gpt2.tiktoken."""

import functools
import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern

BPE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2.tiktoken")
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256  # <|endoftext|>: separates documents, ends every instruction response
N_VOCAB = 50257


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 encoding (cached). encode_ordinary(text) -> ids; decode(ids) -> text."""
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(BPE_FILE),
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=N_VOCAB)


def encode(text):
    """Text -> token ids. '<|endoftext|>' in user text is treated as plain text, never as the special id."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids):
    return get_tokenizer().decode(list(ids))
