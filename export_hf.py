"""Export a checkpoint as a Hugging Face GPT-2 folder: config.json, model.safetensors and GPT-2's tokenizer
files, all built from the bundled BPE ranks, so transformers, vLLM, TGI and lm-eval load it offline."""

import json
import os

from cli import CLIParser, help_requested, run_cli


def build_parser():
    parser = CLIParser(
        description="Export a checkpoint as a Hugging Face GPT-2 folder (weights, config and GPT-2's "
                    "tokenizer files) that transformers, vLLM, TGI and lm-eval load offline.")
    parser.add_argument("--ckpt", required=True,
                        help="the model: our ckpt.pt (or a folder holding one), an HF GPT-2 folder, or a GPT-2 name")
    parser.add_argument("--out-dir", required=True, help="folder to write (created; must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the exported files in a non-empty --out-dir (other files there stay)")
    return parser


if __name__ == "__main__" and help_requested():
    build_parser().parse_args()  # --help answers here, before the ~2 s import of torch (safetensors.torch)

from safetensors.torch import save  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

from checkpoint import load_model  # noqa: E402
from common import UserError, atomic_path, clean_stale_temps  # noqa: E402
from model import GPT2_VOCAB, ours_to_hf  # noqa: E402
from tokenizer import BPE_FILE, EOT_ID, EOT_TOKEN  # noqa: E402


def vocab_and_merges(ranks):
    """tiktoken ranks (= GPT-2's ids) -> (vocab.json dict, merges in rank order). Each token past the 256 bytes is
    one merge, of rank its own: byte-level BPE on it with only lower ranks stops at exactly the pair it joins."""
    # GPT-2's byte -> character table, which vocab.json and merges.txt spell tokens with
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spell = {b: chr(b) for b in bs}  # printable bytes stand for themselves
    for b in range(256):
        if b not in spell:  # space, control and a few Latin-1 bytes move to 256+ so every token is visible text
            spell[b] = chr(256 + len(spell) - len(bs))

    def text(token):
        return "".join(spell[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            r, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            assert r < rank, token
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TOKEN] = EOT_ID
    return vocab, merges


def tokenizer_files(context_length):
    """{file name: text} for GPT-2's tokenizer, as the HF hub's openai-community/gpt2 ships it."""
    vocab, merges = vocab_and_merges(load_tiktoken_bpe(BPE_FILE))
    assert len(vocab) == GPT2_VOCAB, len(vocab)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    eot = {"id": EOT_ID, "content": EOT_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
        "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
        "added_tokens_decoder": {str(EOT_ID): {k: v for k, v in eot.items() if k != "id"}},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def hf_config(cfg):
    """transformers' GPT2Config for our GPTConfig (GELU tanh, LayerNorm eps 1e-5, tied embeddings)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def export(model, out_dir):
    """Write the HF folder for `model` (a GPT) into out_dir; each file appears whole or not at all."""
    cfg = model.config
    if not cfg.bias:
        raise UserError("HF GPT-2 has biases everywhere: a model trained with bias=False cannot be exported")
    if cfg.vocab_size < GPT2_VOCAB:
        raise UserError(f"the model has {cfg.vocab_size} token ids, fewer than GPT-2's {GPT2_VOCAB}: "
                        f"GPT-2's tokenizer does not fit it")
    state = ours_to_hf(model.state_dict(), GPT2_VOCAB)  # padding rows past 50257 are never produced: dropped
    files = {"config.json": json.dumps(hf_config(cfg), indent=2) + "\n", **tokenizer_files(cfg.block_size)}
    # save() to bytes, then write them: save_file() would recreate the temp file as mode 0600
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp, open(tmp, "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    for name, text in files.items():
        with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return sorted(["model.safetensors", *files])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} exists and is not a folder")
    clean_stale_temps(args.out_dir)  # what an interrupted export left
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise UserError(f"--out-dir {args.out_dir} is not empty; pass --overwrite to replace its exported files")
    model, _ = load_model(args.ckpt)
    try:
        names = export(model, args.out_dir)
    except OSError as e:
        raise UserError(f"cannot write {args.out_dir}: {e.strerror or e}") from None
    print(f"wrote {args.out_dir}: {', '.join(names)}")


if __name__ == "__main__":
    run_cli(main)
