"""fineweb.py: text files -> llm.c token shards, and the shard reader."""

import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA, require

import fineweb
from common import UserError
from fineweb import HEADER_BYTES, MAGIC, ShardError, list_shards, read_shard, write_shard
from tokenizer import EOT_ID, decode, encode

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text — with “quotes”, emoji 🙂 and\nnew lines.\n\n",
    "A third, somewhat longer document. " * 20,
    "<|endoftext|> inside a document is plain text, not the special token.",
    "short",
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def read_all_tokens(out_dir):
    """Concatenate val then train shards, in order."""
    paths = list_shards(out_dir, "val")
    if any(name.endswith(".bin") and "_train_" in name for name in os.listdir(out_dir)):
        paths += list_shards(out_dir, "train")
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]), paths


def split_documents(tokens):
    """Token stream -> documents: every document must start with <|endoftext|>."""
    assert tokens[0] == EOT_ID
    starts = np.flatnonzero(tokens == EOT_ID)
    ends = list(starts[1:]) + [len(tokens)]
    return [decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("suffix,opener,workers", [
    (".jsonl", open, 2), (".jsonl.xz", lzma.open, 1), (".jsonl.gz", gzip.open, 1),
])
def test_jsonl_round_trip(tmp_path, suffix, opener, workers):
    src = write_jsonl(tmp_path / f"docs{suffix}", [{"id": i, "text": t} for i, t in enumerate(DOCS)], opener)
    out = tmp_path / "shards"
    result = fineweb.main(["--input", src, "--out-dir", str(out), "--shard-size", "40", "--workers", str(workers),
                           "--no-progress", "--prefix", "demo"])
    tokens, paths = read_all_tokens(out)
    assert os.path.basename(paths[0]) == "demo_val_000000.bin"
    assert [os.path.basename(p) for p in paths[1:3]] == ["demo_train_000001.bin", "demo_train_000002.bin"]
    assert all(len(read_shard(p)) == 40 for p in paths[:-1])  # documents flow across shard boundaries
    assert split_documents(tokens) == DOCS
    assert result["tokens"] == len(tokens) == sum(len(encode(d)) + 1 for d in DOCS)
    header = np.fromfile(paths[0], dtype=np.int32, count=256)
    assert header[:3].tolist() == [MAGIC, 1, 40] and not header[3:].any()
    assert os.path.getsize(paths[0]) == HEADER_BYTES + 2 * 40


def test_txt_and_parquet_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    txt = tmp_path / "one.txt"
    txt.write_text(DOCS[1], encoding="utf-8")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": DOCS[2:], "n": list(range(3))}), parquet)
    out = tmp_path / "shards"
    fineweb.main(["--input", str(txt), str(parquet), "--out-dir", str(out), "--workers", "1", "--no-progress"])
    tokens, paths = read_all_tokens(out)
    assert len(paths) == 1  # everything fits in the val shard
    assert split_documents(tokens) == DOCS[1:]


def test_max_tokens_and_val_tokens(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "s"
    fineweb.main(["--input", src, "--out-dir", str(out), "--shard-size", "25", "--val-tokens", "10",
                  "--max-tokens", "60", "--workers", "1", "--no-progress"])
    assert [len(read_shard(p)) for p in list_shards(out, "val") + list_shards(out, "train")] == [10, 25, 25]
    tokens, _ = read_all_tokens(out)
    full = np.concatenate([[EOT_ID] + encode(d) for d in DOCS])
    assert tokens.tolist() == full[:60].tolist()


def test_real_corpus_slice(tmp_path):
    corpus = os.path.join(SHARED_DATA, "corpus", "standard-ebooks.jsonl.xz")
    require(os.path.isfile(corpus), "shared corpus not present")
    out = tmp_path / "books"
    result = fineweb.main(["--input", corpus, "--out-dir", str(out), "--shard-size", "20000", "--max-tokens", "50000",
                           "--workers", "2", "--no-progress"])
    assert result["tokens"] == 50000 and len(result["shards"]) == 3
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    tokens, _ = read_all_tokens(out)
    assert tokens[0] == EOT_ID
    assert tokens[1:20001].tolist() == encode(first[:200_000])[:20000]


def run_fineweb(args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_wrong_schema_is_one_line_exit_2(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    proc = run_fineweb(["--input", src, "--out-dir", str(tmp_path / "o"), "--workers", "1", "--no-progress"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:2" in lines[0] and "'text'" in lines[0]
    assert not os.path.exists(tmp_path / "o" / "fineweb_val_000000.bin")


@pytest.mark.parametrize("content,needle", [
    (b"\xfd7zXZ\x00garbage that is not xz", "cannot read"),
    (b'{"text": "ok"}\n{not json\n', "not valid JSON"),
    (b'["a list"]\n', "expected a JSON object"),
])
def test_unreadable_input_errors(tmp_path, capsys, content, needle):
    path = tmp_path / ("bad.jsonl.xz" if content.startswith(b"\xfd7z") else "bad.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        fineweb.main(["--input", str(path), "--out-dir", str(tmp_path / "o"), "--workers", "1", "--no-progress"])


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        fineweb.main(["--input", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path / "o")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported input"):
        fineweb.main(["--input", str(tmp_path / "x.csv"), "--out-dir", str(tmp_path / "o"), "--workers", "1"])


def test_hub_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = run_fineweb(["--out-dir", str(tmp_path / "o"), "--no-progress"], env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HuggingFaceFW/fineweb-edu" in lines[0] and "--input" in lines[0]


def test_reader_rejects_corrupt_shards(tmp_path):
    good = write_shard(tmp_path / "x_val_000000.bin", np.arange(100, dtype=np.uint16))
    assert read_shard(good).tolist() == list(range(100))
    data = open(good, "rb").read()
    cases = {
        "truncated": data[:-10],
        "short": data[:100],
        "magic": np.int32(1234).tobytes() + data[4:],
        "version": data[:4] + np.int32(7).tobytes() + data[8:],
    }
    messages = {"truncated": "truncated or corrupt", "short": "header", "magic": "not a token shard",
                "version": "version 7"}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(blob)
        with pytest.raises(ShardError, match=messages[name]):
            read_shard(path)
    with pytest.raises(ShardError, match="no train shards"):
        list_shards(tmp_path, "train")


KILL_MID_WRITE = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
import fineweb
def half_then_die(f, tokens):
    f.write(tokens[: len(tokens) // 2].tobytes())
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
fineweb.write_shard({out!r} + "/k_val_000000.bin", np.arange(50, dtype=np.uint16))  # a whole shard first
fineweb._write_tokens = half_then_die
fineweb.write_shard({out!r} + "/k_train_000001.bin", np.arange(1000, dtype=np.uint16))
"""


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(root=ROOT, out=str(out))], timeout=60)
    assert proc.returncode == -9
    names = sorted(os.listdir(out))
    assert "k_train_000001.bin" not in names  # only a hidden temp file remains
    assert [n for n in names if not n.startswith(".")] == ["k_val_000000.bin"]
    assert read_shard(out / "k_val_000000.bin").tolist() == list(range(50))
    with pytest.raises(ShardError, match="no train shards"):
        list_shards(out, "train")


def test_stale_shards_of_a_longer_run_are_removed(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "s"
    fineweb.main(["--input", src, "--out-dir", str(out), "--shard-size", "20", "--workers", "1", "--no-progress"])
    many = len(list_shards(out, "train"))
    fineweb.main(["--input", src, "--out-dir", str(out), "--shard-size", "20", "--max-tokens", "45",
                  "--workers", "1", "--no-progress"])
    assert many > 2 and len(list_shards(out, "train")) == 2
