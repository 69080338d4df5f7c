"""fineweb.py: text files -> llm.c token shards + manifest, the shard reader, and what protects a set."""

import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

import fineweb
from common import UserError, atomic_path
from fineweb import HEADER_BYTES, MAGIC, MANIFEST, list_shards, read_shard, write_manifest, write_shard
from tokenizer import EOT_ID, N_VOCAB, decode, encode

BOOKS = os.path.join(ROOT, "demo_data", "books.jsonl.xz")
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text — with “quotes”, emoji 🙂 and\nnew lines.\n\n",
    "A third, somewhat longer document. " * 20,
    "<|endoftext|> inside a document is plain text, not the special token.",
    "short",
]
N_DOCS = sum(len(encode(d)) + 1 for d in DOCS)  # 202 tokens


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def run(src, out, *flags):
    return fineweb.main(["--input", *([src] if isinstance(src, str) else src), "--out-dir", str(out),
                         "--workers", "1", "--no-progress", *map(str, flags)])


def read_all_tokens(out_dir):
    """Val then train shards, as the manifest lists them."""
    paths = list_shards(out_dir, "val") + list_shards(out_dir, "train")
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]), paths


def split_documents(tokens):
    """Token stream -> documents: every document must start with <|endoftext|>."""
    assert tokens[0] == EOT_ID
    starts = np.flatnonzero(tokens == EOT_ID)
    ends = list(starts[1:]) + [len(tokens)]
    return [decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture
def docs_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])


@pytest.mark.parametrize("suffix,opener,workers", [
    (".jsonl", open, 2), (".jsonl.xz", lzma.open, 1), (".jsonl.gz", gzip.open, 1),
])
def test_jsonl_round_trip(tmp_path, suffix, opener, workers):
    src = write_jsonl(tmp_path / f"docs{suffix}", [{"id": i, "text": t} for i, t in enumerate(DOCS)], opener)
    out = tmp_path / "shards"
    result = fineweb.main(["--input", src, "--out-dir", str(out), "--shard-size", "40", "--val-tokens", "40",
                           "--workers", str(workers), "--no-progress", "--prefix", "demo"])
    tokens, paths = read_all_tokens(out)
    assert [os.path.basename(p) for p in paths[:3]] == ["demo_val_000000.bin", "demo_train_000001.bin",
                                                        "demo_train_000002.bin"]
    assert all(len(read_shard(p)) == 40 for p in paths[:-1])  # documents flow across shard boundaries
    assert split_documents(tokens) == DOCS
    assert result["tokens"] == len(tokens) == N_DOCS and result["documents"] == len(DOCS)
    header = np.fromfile(paths[0], dtype=np.int32, count=256)
    assert header[:3].tolist() == [MAGIC, 1, 40] and not header[3:].any()
    assert os.path.getsize(paths[0]) == HEADER_BYTES + 2 * 40
    manifest = json.load(open(out / MANIFEST))
    assert [s["file"] for s in manifest["shards"]] == [os.path.basename(p) for p in paths]
    assert sum(s["tokens"] for s in manifest["shards"]) == N_DOCS


def test_txt_and_parquet_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    txt = tmp_path / "one.txt"
    txt.write_text(DOCS[1], encoding="utf-8")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": DOCS[2:], "n": list(range(3))}), parquet)
    run([str(txt), str(parquet)], tmp_path / "shards", "--val-tokens", "10")
    tokens, paths = read_all_tokens(tmp_path / "shards")
    assert len(paths) == 2 and split_documents(tokens) == DOCS[1:]


def test_max_tokens_and_val_tokens(docs_file, tmp_path):
    run(docs_file, tmp_path / "s", "--shard-size", "25", "--val-tokens", "10", "--max-tokens", "60")
    tokens, paths = read_all_tokens(tmp_path / "s")
    assert [len(read_shard(p)) for p in paths] == [10, 25, 25]
    full = np.concatenate([[EOT_ID] + encode(d) for d in DOCS])
    assert tokens.tolist() == full[:60].tolist()


def test_default_val_is_one_percent_capped_at_a_shard_and_always_leaves_training_data(docs_file, tmp_path):
    # a corpus smaller than one shard: 1% val, the rest trains (it used to become one val shard, no train)
    run(docs_file, tmp_path / "small")
    assert [len(read_shard(p)) for p in list_shards(tmp_path / "small", "val")] == [N_DOCS // 100]
    assert sum(len(read_shard(p)) for p in list_shards(tmp_path / "small", "train")) == N_DOCS - N_DOCS // 100
    tokens, _ = read_all_tokens(tmp_path / "small")
    assert sorted(tokens.tolist()) == sorted(np.concatenate([[EOT_ID] + encode(d) for d in DOCS]).tolist())
    # 1% of 202 tokens is 2; with shards of 1 token the cap (one shard) wins
    run(docs_file, tmp_path / "capped", "--shard-size", "1")
    assert [len(read_shard(p)) for p in list_shards(tmp_path / "capped", "val")] == [1]
    # an explicit val that leaves nothing to train on is refused (up front when --max-tokens says so)
    with pytest.raises(UserError, match="pass a smaller --val-tokens"):
        run(docs_file, tmp_path / "all", "--val-tokens", "1000")
    with pytest.raises(UserError, match="pass a smaller --val-tokens"):
        run(docs_file, tmp_path / "all2", "--val-tokens", "50", "--max-tokens", "50")
    assert not os.path.exists(tmp_path / "all" / MANIFEST) and not os.path.exists(tmp_path / "all2")


def test_bundled_books_slice(tmp_path):
    result = run(BOOKS, tmp_path / "books", "--shard-size", "20000", "--max-tokens", "50000", "--prefix", "books")
    assert result["tokens"] == 50000 and len(result["shards"]) == 4  # val 500, 2 x 20000, rest 9500
    with lzma.open(BOOKS, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    val, held_back = read_shard(result["shards"][0]), read_shard(result["shards"][-1])
    assert len(val) == 500 and len(held_back) == 19500  # the rest of the first 20000 tokens trains, last
    assert val.tolist() + held_back.tolist() == [EOT_ID] + encode(first[:200_000])[:19999]


def run_fineweb(args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_wrong_schema_is_one_line_exit_2(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    proc = run_fineweb(["--input", src, "--out-dir", str(tmp_path / "o"), "--workers", "1", "--no-progress"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:2" in lines[0] and "'text'" in lines[0]
    assert not os.path.exists(tmp_path / "o")  # a failed run removes the folder it made


@pytest.mark.parametrize("content,needle", [
    (b"\xfd7zXZ\x00garbage that is not xz", "cannot read"),
    (b'{"text": "ok"}\n{not json\n', "not valid JSON"),
    (b'["a list"]\n', "expected a JSON object"),
])
def test_unreadable_input_errors(tmp_path, content, needle):
    path = tmp_path / ("bad.jsonl.xz" if content.startswith(b"\xfd7z") else "bad.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        run(str(path), tmp_path / "o")


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run(str(tmp_path / "nope.jsonl"), tmp_path / "o")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported input"):
        run(str(tmp_path / "x.csv"), tmp_path / "o")


def test_hub_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = run_fineweb(["--out-dir", str(tmp_path / "o"), "--no-progress"], env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HuggingFaceFW/fineweb-edu" in lines[0] and "--input" in lines[0]


def test_reader_rejects_corrupt_shards_and_out_of_vocabulary_ids(tmp_path):
    good = write_shard(tmp_path / "x_val_000000.bin", np.arange(100))
    assert read_shard(good).tolist() == list(range(100))
    data = open(good, "rb").read()
    bad_id = data[:-2] + np.uint16(N_VOCAB).tobytes()  # well-formed, but id 50257 is past the vocabulary
    cases = {"truncated or corrupt": data[:-10], "not a token shard": data[:100],
             "not a token shard ": np.int32(1234).tobytes() + data[4:],
             "not a token shard  ": data[:4] + np.int32(7).tobytes() + data[8:],
             f"holds token id {N_VOCAB}, outside": bad_id}
    for message, blob in cases.items():
        path = tmp_path / "bad.bin"
        path.write_bytes(blob)
        with pytest.raises(UserError, match=message.strip()) as e:
            read_shard(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="token ids"):
        write_shard(tmp_path / "y_val_000000.bin", [N_VOCAB])


def test_training_reads_only_a_finished_set(docs_file, tmp_path):
    out = tmp_path / "s"
    run(docs_file, out, "--shard-size", "50")
    assert len(list_shards(out, "train")) == 5
    manifest = json.load(open(out / MANIFEST))
    # a folder without a manifest (shards of an interrupted run) is refused
    os.rename(out / MANIFEST, tmp_path / "kept.json")
    with pytest.raises(UserError, match="no train shards in .*no finished set"):
        list_shards(out, "train")
    os.rename(tmp_path / "kept.json", out / MANIFEST)
    # a listed file that is missing or changed since is refused; unlisted files are never read
    write_shard(out / "fineweb_train_000099.bin", np.arange(10))
    assert len(list_shards(out, "train")) == 5
    victim = out / manifest["shards"][1]["file"]
    write_shard(victim, np.arange(7))
    with pytest.raises(UserError, match="truncated or corrupt: it does not match manifest.json"):
        list_shards(out, "train")
    # shards written by hand become a set once a manifest lists them
    hand = tmp_path / "hand"
    paths = [write_shard(hand / "p_val_000000.bin", np.arange(5)), write_shard(hand / "p_train_000001.bin", [7])]
    write_manifest(hand, paths)
    assert list_shards(hand, "train") == paths[1:]


def test_rerun_refuses_a_finished_set_unless_overwrite(docs_file, tmp_path):
    out = tmp_path / "s"
    run(docs_file, out, "--shard-size", "50")
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    proc = run_fineweb(["--input", docs_file, "--out-dir", str(out), "--shard-size", "20", "--no-progress"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--overwrite" in proc.stderr
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before
    # --overwrite replaces the whole set: no shard of the longer first run remains
    run(docs_file, out, "--shard-size", "20", "--max-tokens", "45", "--overwrite")
    tokens, paths = read_all_tokens(out)
    assert len(tokens) == 45 and sorted(os.listdir(out)) == sorted([MANIFEST] + [os.path.basename(p) for p in paths])


KILLED_RUN = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import fineweb
from common import atomic_path
write = fineweb.write_shard
def write_then_die(path, tokens):
    write(path, tokens)
    if path.endswith("_train_000002.bin"):  # killed in the middle of the next write
        with atomic_path(path.replace("000002", "000003")) as tmp:
            open(tmp, "wb").write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
fineweb.write_shard = write_then_die
fineweb.main(["--input", {src!r}, "--out-dir", {out!r}, "--shard-size", "30", "--workers", "1", "--no-progress"]
             + sys.argv[1:])
"""


def test_interrupted_run_leaves_nothing_training_accepts(docs_file, tmp_path):
    out = tmp_path / "s"
    script = KILLED_RUN.format(root=ROOT, src=docs_file, out=str(out))
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -signal.SIGKILL
    names = os.listdir(out)
    assert "fineweb_train_000002.bin" in names and MANIFEST not in names and any(n.endswith(".tmp") for n in names)
    with pytest.raises(UserError, match="no train shards in .*no finished set"):
        list_shards(out, "train")
    with pytest.raises(UserError, match="unfinished run: pass --overwrite"):
        run(docs_file, out, "--shard-size", "30")
    assert not any(n.endswith(".tmp") for n in os.listdir(out))  # temp files of killed writes go at start
    # killed again, this time while overwriting a finished set: still nothing readable
    run(docs_file, out, "--shard-size", "30", "--overwrite")
    assert subprocess.run([sys.executable, "-c", script, "--overwrite"], timeout=60).returncode == -signal.SIGKILL
    with pytest.raises(UserError, match="no finished set"):
        list_shards(out, "val")
    run(docs_file, out, "--shard-size", "30", "--overwrite")
    assert len(read_all_tokens(out)[0]) == N_DOCS


HELD_RUN = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import fineweb
write = fineweb.write_shard
def write_then_wait(path, tokens):  # holds the run open after its first shard until `go` exists
    path = write(path, tokens)
    while not os.path.exists({go!r}):
        time.sleep(0.05)
    return path
fineweb.write_shard = write_then_wait
fineweb.main(["--input", {src!r}, "--out-dir", {out!r}, "--shard-size", "30", "--workers", "1", "--no-progress"])
"""


@pytest.mark.parametrize("nested", [False, True])
def test_a_concurrent_run_into_the_same_folder_is_refused(docs_file, tmp_path, nested):
    out, go = tmp_path / ("new/deeper/s" if nested else "s"), tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN.format(root=ROOT, src=docs_file, out=str(out), go=str(go))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.isdir(out) and any(n.endswith(".bin") for n in os.listdir(out))):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        written = sorted(os.listdir(out))
        for flags in ([], ["--overwrite"]):  # the same run, or one that would replace it: both refused
            second = run_fineweb(["--input", docs_file, "--out-dir", str(out), "--shard-size", "30",
                                  "--no-progress", *flags])
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1 and "another fineweb.py run" in lines[0], second.stderr
            assert sorted(os.listdir(out)) == written  # the refused run touched nothing
        go.touch()
        assert first.wait(60) == 0, first.communicate()
    finally:
        first.kill()
    tokens, paths = read_all_tokens(out)
    assert len(tokens) == N_DOCS and sorted(os.listdir(out)) == sorted([MANIFEST] + [os.path.basename(p) for p in paths])


def test_a_failed_run_removes_what_it_made_and_nothing_else(docs_file, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in DOCS] * 20 + [{"body": "no text"}])
    for out in (tmp_path / "new" / "s", tmp_path / "mine"):
        if out.name == "mine":
            out.mkdir()
            (out / "notes.txt").write_text("the user's")
        # shards of the first 64 documents are written before line 101 is read
        proc = run_fineweb(["--input", bad, "--out-dir", str(out), "--shard-size", "30", "--workers", "1", "--no-progress"])
        assert proc.returncode == 2 and "bad.jsonl:101:" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "d.jsonl", "mine"]  # new/ and new/s went
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # its shards went, the user's file stayed
