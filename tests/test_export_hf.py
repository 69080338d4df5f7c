import os
import stat
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

import export_hf
import tokenizer
from checkpoint import save_checkpoint
from common import run_cli
from conftest import ROOT, tiny_config
from model import GPT

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Text where byte-level BPE goes wrong if any table is off: multi-byte characters split across tokens,
# whitespace runs (the pre-tokenizer keeps the last space for the next word), contractions, digits.
UNICODE_TEXTS = [
    "Hello, world! I'll say they're fine; we've 12345 apples.",
    "naïve café, Ærøskøbing, São Paulo, Ελληνικά, Кириллица",
    "emoji: 😀🎉👩‍👩‍👧 ✔️ and 🇫🇷",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "  leading spaces,   runs   of spaces,\ttabs\t\tand\n\n\nnewlines  \n  ",
    "trailing whitespace   ",
    "ǅ ﬁ Ω ½ ² \u00a0 non-breaking \u200b zero width",
    "code: def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, folder): a tiny random model saved as our checkpoint, exported by the CLI as a user runs it."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    tmp = tmp_path_factory.mktemp("export")
    ckpt = save_checkpoint(tmp / "ckpt", kind="sft", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=7)
    out = tmp / "hf"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "export_hf.py"), "--ckpt", ckpt, "--out-dir", str(out)],
        cwd=tmp, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stderr
    return model, out


def test_transformers_loads_the_folder_offline_with_our_logits(exported, monkeypatch):
    model, out = exported
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    assert theirs.config.vocab_size == tokenizer.N_VOCAB
    idx = torch.randint(0, tokenizer.N_VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        got = theirs(idx).logits
    assert (ours[..., :tokenizer.N_VOCAB] - got).abs().max().item() <= 1e-4


def test_tokenizer_loads_offline_and_matches_ours(exported, monkeypatch):
    _, out = exported
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    auto = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))  # what TGI reads
    assert auto.eos_token_id == auto.bos_token_id == tokenizer.EOT_ID
    assert len(auto) == tokenizer.N_VOCAB and auto.model_max_length == 128  # the model's context
    for text in UNICODE_TEXTS:
        ids = tokenizer.encode(text)
        assert auto(text)["input_ids"] == ids, text
        assert fast.encode(text).ids == ids, text
        assert auto.decode(ids) == text
    assert auto.convert_ids_to_tokens(tokenizer.encode(" hello")) == ["Ġhello"]  # GPT-2's own spelling


def test_merges_are_gpt2s_in_rank_order():
    files = export_hf.tokenizer_files(1024)
    lines = files["merges.txt"].splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 50000
    assert lines[1:4] == ["Ġ t", "Ġ a", "h e"]  # the first merges of GPT-2's vocab.bpe


def test_files_have_normal_permissions(exported):
    _, out = exported
    names = sorted(os.listdir(out))
    assert names == ["config.json", "merges.txt", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json"]
    for name in names:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(export_hf.main, argv)
    err = capsys.readouterr().err
    return e.value.code, err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, exported):
    _, out = exported
    code, err = _cli(["--ckpt", str(tmp_path / "missing")], capsys)
    assert code == 2 and "--out-dir" in err and err.count("\n") == 1

    code, err = _cli(["--ckpt", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and err.startswith("error: ") and "missing" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, err = _cli(["--ckpt", str(junk), "--out-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    code, err = _cli(["--ckpt", str(junk), "--out-dir", str(a_file)], capsys)
    assert code == 2 and "not a folder" in err and err.count("\n") == 1
    assert a_file.read_text() == "mine"


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys, exported):
    model, _ = exported
    ckpt = save_checkpoint(tmp_path / "ckpt", kind="sft", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=7)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".config.json.abcd1234.tmp").write_text("left by an interrupted export")
    export_hf.main(["--ckpt", ckpt, "--out-dir", str(out)])  # such leftovers do not make the folder "not empty"
    (out / "notes.txt").write_text("mine")
    code, err = _cli(["--ckpt", ckpt, "--out-dir", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"

    export_hf.main(["--ckpt", ckpt, "--out-dir", str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine"  # only the exported files are replaced
    assert (out / "model.safetensors").is_file() and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_an_exported_folder_exports_to_the_same_files(tmp_path, exported):
    """--ckpt also takes an HF GPT-2 folder: exporting our export gives the same weights, config and tokenizer."""
    _, out = exported
    export_hf.main(["--ckpt", str(out), "--out-dir", str(tmp_path / "again")])
    for name in os.listdir(out):
        if name != "model.safetensors":
            assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    first, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
