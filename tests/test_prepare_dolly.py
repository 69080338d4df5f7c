"""prepare_dolly.py: schema check, cleaning, drop counts, stratified split, tokenization/mask, output format."""

import gzip
import json
import lzma
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT

import prepare_dolly as pd
from common import UserError
from prompt import format_prompt
from tokenizer import EOT_ID, EOT_TOKEN, decode, encode

WIKI = os.path.join(ROOT, "demo_data", "instructions.jsonl.xz")  # CC BY-SA, see demo_data/README.md
N_SLICE = 300


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def row(instruction, response, context="", category="open_qa"):
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def run_main(*argv):
    return pd.main([*map(str, argv), "--no-progress"])


def run_cli(*argv, env=None):
    """The CLI in a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "prepare_dolly.py", *map(str, argv), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    return p.returncode, p.stdout, p.stderr


def split_examples(data):
    """[(tokens, mask)] per example of a loaded split."""
    o = data["offsets"]
    return [(data["tokens"][a:b], data["loss_mask"][a:b]) for a, b in zip(o[:-1], o[1:])]


@pytest.fixture(scope="module")
def wiki_rows():
    with lzma.open(WIKI, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(N_SLICE)]


@pytest.fixture(scope="module")
def wiki_file(wiki_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("wiki") / "slice.jsonl", wiki_rows)


@pytest.fixture(scope="module")
def wiki_out(wiki_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki_out")
    meta = run_main("--input", wiki_file, "--out-dir", out, "--val-fraction", 0.1, "--seed", 3)
    return out, meta


def assert_nothing_written(out):
    assert not os.path.exists(out) or os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# cleaning


@pytest.mark.parametrize("raw, clean", [
    ("  a  b\t\tc  ", "a b c"),                                  # strip, collapse spaces/tabs
    ("x\r\ny\rz\u2028w", "x\ny\nz\nw"),                         # newlines unified
    ("p1\n\n\n\np2\n \n\t\np3", "p1\n\np2\n\np3"),              # paragraph breaks kept, extra blank lines go
    ("def f():\n    return  1  \n\tx", "def f():\n    return 1\n\tx"),  # indentation kept, trailing removed
    ("109.36\u00a0yd c.\u20091879", "109.36 yd c. 1879"),       # no-break / thin spaces -> space
    ("e\u0301", "\u00e9"),                                      # NFC
    (" \t\n ", ""),
])
def test_normalize_text(raw, clean):
    assert pd.normalize_text(raw) == clean


# ---------------------------------------------------------------------------------------------
# output format, tokenization and mask


def test_outputs_exist_with_right_dtypes_and_consistent_offsets(wiki_out):
    out, meta = wiki_out
    assert sorted(os.listdir(out)) == ["meta.json", "train.npz", "val.npz"]
    total = 0
    for split in ("train", "val"):
        with np.load(out / f"{split}.npz", allow_pickle=False) as f:
            assert sorted(f.files) == ["loss_mask", "offsets", "tokens"]
            tokens, mask, offsets = f["tokens"], f["loss_mask"], f["offsets"]
        assert tokens.dtype == np.uint16 and mask.dtype == np.uint8 and offsets.dtype == np.int64
        assert tokens.shape == mask.shape and tokens.ndim == 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens) and np.all(np.diff(offsets) > 0)
        assert len(offsets) - 1 == meta["rows"][split] == meta["token_stats"][split]["examples"]
        assert meta["token_stats"][split]["tokens"] == len(tokens)
        assert meta["token_stats"][split]["response_tokens"] == int(mask.sum())
        assert np.all(tokens[offsets[1:] - 1] == EOT_ID)
        loaded = pd.load_split(out / f"{split}.npz")
        assert np.array_equal(loaded["tokens"], tokens) and np.array_equal(loaded["offsets"], offsets)
        total += len(offsets) - 1
    assert total == meta["rows"]["kept"] == N_SLICE  # the slice needs no dropping
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["template_version"] == 1 and on_disk["seed"] == 3 and on_disk["max_len"] == 1024
    assert on_disk["val_fraction"] == 0.1 and on_disk["tokenizer"].startswith("gpt2")
    assert on_disk["rows"]["dropped"] == {"empty_instruction": 0, "empty_response": 0, "duplicate": 0,
                                          "too_long": 0}


def test_examples_decode_to_the_inference_template_and_mask_covers_response_and_eot(wiki_out, wiki_rows):
    out, _ = wiki_out
    norm = pd.normalize_text
    expected = {format_prompt(norm(r["instruction"]), norm(r["context"])): norm(r["response"]) for r in wiki_rows}
    with_context = without_context = 0
    for split in ("train", "val"):
        for toks, mask in split_examples(pd.load_split(out / f"{split}.npz")):
            n_prompt = int((mask == 0).sum())
            assert np.all(mask[:n_prompt] == 0) and np.all(mask[n_prompt:] == 1)  # one boundary
            prompt = decode(toks[:n_prompt])
            response = expected[prompt]  # KeyError: the prompt is not the template of any row
            # exactly what inference feeds the model: the prompt string encoded alone
            assert toks[:n_prompt].tolist() == encode(prompt)
            assert toks[n_prompt:].tolist() == encode(response) + [EOT_ID]
            assert decode(toks) == prompt + response + EOT_TOKEN
            assert decode(toks[mask == 1]) == response + EOT_TOKEN
            if "### Input:\n" in prompt:
                with_context += 1
            else:
                without_context += 1
    assert with_context > 50 and without_context > 50


def test_handmade_rows_give_the_exact_text(tmp_path):
    rows = [row("  Name a\t\tcolour.  ", " Blue.\r\n\r\n\r\nOr red. ", category="brainstorming"),
            row("Summarise.", "Cats sleep.", context="Cats  sleep a lot.\n\n\n\nReally.", category="summarization")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_main("--input", src, "--out-dir", tmp_path / "out", "--val-fraction", 0)
    data = pd.load_split(tmp_path / "out" / "train.npz")
    texts = [decode(t) for t, _ in split_examples(data)]
    assert texts == [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.\n\nOr red.<|endoftext|>",
        format_prompt("Summarise.", "Cats sleep a lot.\n\nReally.") + "Cats sleep." + EOT_TOKEN,
    ]
    masked = [decode(t[m == 1]) for t, m in split_examples(data)]
    assert masked == ["Blue.\n\nOr red.<|endoftext|>", "Cats sleep.<|endoftext|>"]
    assert pd.load_split(tmp_path / "out" / "val.npz")["offsets"].tolist() == [0]  # --val-fraction 0


# ---------------------------------------------------------------------------------------------
# split


def test_split_is_stratified_by_category(wiki_out, wiki_rows):
    _, meta = wiki_out
    totals = {}
    for r in wiki_rows:
        totals[r["category"]] = totals.get(r["category"], 0) + 1
    assert set(meta["categories"]) == set(totals)
    for cat, counts in meta["categories"].items():
        assert counts["train"] + counts["val"] == totals[cat]
        assert counts["val"] >= 1
        assert abs(counts["val"] - 0.1 * totals[cat]) <= 1
    assert abs(meta["rows"]["val"] - 0.1 * N_SLICE) <= len(totals)


def test_split_is_deterministic_per_seed(wiki_file, tmp_path):
    def val_tokens(seed, name):
        run_main("--input", wiki_file, "--out-dir", tmp_path / name, "--seed", seed, "--val-fraction", 0.1)
        return pd.load_split(tmp_path / name / "val.npz")

    a, b, c = val_tokens(5, "a"), val_tokens(5, "b"), val_tokens(6, "c")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["offsets"], c["offsets"]) or not np.array_equal(a["tokens"], c["tokens"])


def test_small_categories():
    cats = ["a", "a", "b", "c", "c", "c", "d"] + ["e"] * 100
    train, val = pd.stratified_split(cats, 0.05, seed=0)
    assert sorted(train + val) == list(range(len(cats)))
    val_cats = [cats[i] for i in val]
    assert val_cats.count("a") == 1 and val_cats.count("c") == 1  # >= 2 rows: at least one in val
    assert "b" not in val_cats and "d" not in val_cats  # a single row stays in train
    assert val_cats.count("e") == 5
    assert {cats[i] for i in train} == set(cats)  # every category keeps training rows
    assert pd.stratified_split(cats, 0.0, seed=0) == (list(range(len(cats))), [])


# ---------------------------------------------------------------------------------------------
# dropping


def test_each_drop_reason_is_counted_and_reported(tmp_path, capsys):
    ok = row("Name a colour.", "Blue.")
    long_response = " ".join(["word"] * 300)
    rows = [ok,
            row("   ", "An answer."),                                # empty instruction
            row("", ""),                                             # empty both: counted as empty_instruction
            row("Why?", " \n\t "),                                   # empty response
            row(" Name  a colour. ", "Blue.  ", category="other"),   # duplicate of ok after cleaning
            row("Write a lot.", long_response),                      # too long for --max-len 200
            row("Name a city.", "Paris.", category="classification"),
            row("Name a river.", "Nile.", category="classification")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    meta = run_main("--input", src, "--out-dir", tmp_path / "out", "--max-len", 200)
    assert meta["rows"]["dropped"] == {"empty_instruction": 2, "empty_response": 1, "duplicate": 1, "too_long": 1}
    assert meta["rows"]["read"] == 8 and meta["rows"]["kept"] == 3
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["rows"] == meta["rows"]
    printed = capsys.readouterr().out
    assert "8 read, 3 kept, 5 dropped" in printed
    assert "empty_instruction 2, empty_response 1, duplicate 1, too_long 1" in printed
    assert "classification" in printed and "example length mean / p95 / max" in printed


def test_max_len_counts_the_whole_templated_example(tmp_path):
    r = row("Name a colour.", "Blue.")
    length = len(encode(format_prompt(r["instruction"]))) + len(encode(r["response"])) + 1
    src = write_jsonl(tmp_path / "in.jsonl", [r, row("Name a city.", "Paris is the capital of France.")])
    meta = run_main("--input", src, "--out-dir", tmp_path / "a", "--max-len", length, "--val-fraction", 0)
    assert meta["rows"]["kept"] == 1 and meta["token_stats"]["train"]["example_len"]["max"] == length
    with pytest.raises(UserError, match="all 2 rows were dropped.*too_long 2"):
        run_main("--input", src, "--out-dir", tmp_path / "b", "--max-len", length - 1)
    assert_nothing_written(tmp_path / "b")


def test_a_val_split_that_would_be_empty_is_refused(tmp_path):
    rows = [row("Name a colour.", "Blue."), row("Name a city.", "Paris.", category="x")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(UserError, match="no row can be held out for validation.*pass --val-fraction 0"):
        run_main("--input", src, "--out-dir", tmp_path / "out")  # two categories of one row each
    assert_nothing_written(tmp_path / "out")
    assert run_main("--input", src, "--out-dir", tmp_path / "out", "--val-fraction", 0)["rows"]["train"] == 2


def test_all_rows_empty_is_a_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [row("Q?", " "), row("", "A.")])
    with pytest.raises(UserError, match=r"all 2 rows were dropped \(empty_instruction 1, empty_response 1\)"):
        run_main("--input", src, "--out-dir", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("lines, message", [
    ([row("a", "b"), row("c", "d"), {"instruction": "e", "context": "", "category": "x"}],
     ':3: field "response" is missing'),
    ([row("a", "b"), '{"instruction": "c", "context": ', row("e", "f")],
     ":2: not valid JSON"),
])
def test_schema_errors_from_the_cli_name_line_and_field(tmp_path, lines, message):
    src = write_jsonl(tmp_path / "input.jsonl", lines)
    rc, _, err = run_cli("--input", src, "--out-dir", tmp_path / "out")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {src}{message}")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("lines, message", [
    ([row("a", "b"), {**row("c", "d"), "context": 7}], ':2: field "context" must be a string, got int'),
    ([row("a", "b"), {**row("c", "d"), "category": None}], ':2: field "category" must be a string, got null'),
    ([row("a", "b"), "[1, 2]"], ":2: expected a JSON object"),
])
def test_schema_errors_name_line_and_field(tmp_path, lines, message):
    src = write_jsonl(tmp_path / "input.jsonl", lines)
    with pytest.raises(UserError) as e:
        run_main("--input", src, "--out-dir", tmp_path / "out")
    assert str(e.value).startswith(f"{src}{message}")
    assert_nothing_written(tmp_path / "out")


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no rows"):
        run_main("--input", tmp_path / "empty.jsonl", "--out-dir", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_other_input_errors(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        run_main("--input", tmp_path / "missing.jsonl", "--out-dir", tmp_path / "out")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        run_main("--input", tmp_path / "rows.csv", "--out-dir", tmp_path / "out")
    (tmp_path / "arr.json").write_text(json.dumps([row("a", "b")]))
    with pytest.raises(UserError, match="unsupported file type"):
        run_main("--input", tmp_path / "arr.json", "--out-dir", tmp_path / "out")
    write_jsonl(tmp_path / "rows.jsonl", [row("a", "b"), {"instruction": "c"}])
    with pytest.raises(UserError, match='rows.jsonl:2: field "context" is missing'):
        run_main("--input", tmp_path / "rows.jsonl", "--out-dir", tmp_path / "out")
    (tmp_path / "trunc.jsonl.xz").write_bytes(lzma.compress(b'{"a": 1}\n' * 100)[:40])
    with pytest.raises(UserError, match="cannot read"):
        run_main("--input", tmp_path / "trunc.jsonl.xz", "--out-dir", tmp_path / "out")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(row("a", "b")).encode() + b"\n" + b'{"x": "\xe9"}\n')
    with pytest.raises(UserError, match="latin1.jsonl:2: not UTF-8"):
        run_main("--input", tmp_path / "latin1.jsonl", "--out-dir", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    for flag, value in [("--val-fraction", 1), ("--val-fraction", -0.1), ("--max-len", 1), ("--limit", 0)]:
        with pytest.raises(UserError, match=flag):
            run_main("--input", tmp_path / "rows.jsonl", "--out-dir", tmp_path / "out", flag, value)


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_interrupted_write_leaves_no_partial_file(wiki_file, tmp_path, monkeypatch):
    real_savez, calls = np.savez, []

    def savez_then_crash(f, **arrays):
        calls.append(1)
        if len(calls) == 2:  # the first split is complete (in its temp file), the second is half-written
            f.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("disk full")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run_main("--input", wiki_file, "--out-dir", tmp_path / "fresh")
    assert_nothing_written(tmp_path / "fresh")  # no npz, no meta.json, no temp files

    # over an earlier complete output: the old files stay, whole and unchanged
    monkeypatch.setattr(np, "savez", real_savez)
    old = tmp_path / "old"
    run_main("--input", wiki_file, "--out-dir", old, "--limit", 100)
    before = {n: (old / n).read_bytes() for n in os.listdir(old)}
    calls.clear()
    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(RuntimeError):
        run_main("--input", wiki_file, "--out-dir", old, "--seed", 9)
    assert {n: (old / n).read_bytes() for n in os.listdir(old)} == before


# ---------------------------------------------------------------------------------------------
# input formats and sources


def test_compressed_inputs_give_the_same_data(wiki_rows, tmp_path):
    rows = wiki_rows[:60]
    files = [write_jsonl(tmp_path / "r.jsonl", rows),
             write_jsonl(tmp_path / "r.jsonl.gz", rows, opener=gzip.open),
             write_jsonl(tmp_path / "r.jsonl.xz", rows, opener=lzma.open)]
    results = []
    for i, src in enumerate(files):
        meta = run_main("--input", src, "--out-dir", tmp_path / f"o{i}", "--val-fraction", 0.1)
        assert meta["rows"]["kept"] == 60 and meta["source"]["type"] == "file"
        results.append({s: pd.load_split(tmp_path / f"o{i}" / f"{s}.npz") for s in ("train", "val")})
    for other in results[1:]:
        for s in ("train", "val"):
            assert all(np.array_equal(results[0][s][k], other[s][k]) for k in results[0][s])


def test_limit_reads_the_first_rows(wiki_file, wiki_rows, tmp_path):
    meta = run_main("--input", wiki_file, "--out-dir", tmp_path / "out", "--limit", 25, "--val-fraction", 0)
    assert meta["rows"]["read"] == 25 and meta["source"]["limit"] == 25
    first = decode(split_examples(pd.load_split(tmp_path / "out" / "train.npz"))[0][0])
    assert first.startswith(format_prompt(pd.normalize_text(wiki_rows[0]["instruction"]),
                                          pd.normalize_text(wiki_rows[0]["context"])))


def test_hub_source_rows_are_checked_and_prepared(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [row("Name a colour.", "Blue."), row("Name a city.", "Paris.", category="classification"),
                row("Name a river.", "Nile.", category="classification")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = run_main("--out-dir", tmp_path / "out")
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert meta["source"]["type"] == "huggingface" and meta["rows"]["kept"] == 3
    assert meta["source"]["name"] == "databricks/databricks-dolly-15k"

    def bad_rows(name, split):
        return [row("a", "b"), {"instruction": "c", "context": "", "response": 3, "category": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=bad_rows))
    with pytest.raises(UserError, match='databricks-dolly-15k row 2: field "response" must be a string, got int'):
        run_main("--out-dir", tmp_path / "out2")


def test_hub_offline_fails_with_one_line_error_suggesting_input(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    rc, _, err = run_cli("--out-dir", tmp_path / "out", env=env)
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: could not load databricks/databricks-dolly-15k") and "--input" in err
    assert_nothing_written(tmp_path / "out")


def test_help_describes_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        pd.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--out-dir", "--val-fraction", "--max-len", "--seed", "--limit"):
        assert flag in text


# ---------------------------------------------------------------------------------------------
# load_split


def test_load_split_rejects_malformed_files(wiki_out, tmp_path):
    out, _ = wiki_out
    good = pd.load_split(out / "val.npz")
    t, m, o = good["tokens"], good["loss_mask"], good["offsets"]
    bad = {
        "missing": ({"tokens": t, "offsets": o}, "missing array"),
        "dtype": ({"tokens": t.astype(np.int32), "loss_mask": m, "offsets": o}, "tokens must be a 1-D uint16"),
        "mask_len": ({"tokens": t, "loss_mask": m[:-1], "offsets": o}, "loss_mask has"),
        "end": ({"tokens": t, "loss_mask": m, "offsets": np.append(o[:-1], o[-1] - 1)}, "end at len"),
        "order": ({"tokens": t, "loss_mask": m, "offsets": o[[0, 2, 1, *range(3, len(o))]]}, "increase"),
        "mask_values": ({"tokens": t, "loss_mask": m * 2, "offsets": o}, "only 0 and 1"),
        "no_eot": ({"tokens": np.where(t == EOT_ID, 0, t).astype(np.uint16), "loss_mask": m, "offsets": o},
                   "must end with"),
        "pickled": ({"tokens": np.array([object()], dtype=object), "loss_mask": m, "offsets": o}, "not a valid"),
    }
    for name, (arrays, message) in bad.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(UserError, match=message):
            pd.load_split(path)
    with pytest.raises(UserError, match="not found"):
        pd.load_split(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a valid"):
        pd.load_split(tmp_path / "junk.npz")
