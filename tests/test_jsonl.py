"""The one JSONL reader (common.iter_jsonl) under every data tool: bad input of any kind is one line
`error: path:line: message` naming the right line, and exit 2, never a traceback."""

import gzip
import json
import random

import pytest

import fineweb
import hellaswag
import prepare_dolly
from common import MAX_LINE_BYTES, run_cli

ROWS = {  # a valid row of each tool's input
    "fineweb": {"text": "A short document."},
    "prepare_dolly": {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    "hellaswag": {"ctx": "A man", "endings": ["runs.", "sits.", "eats.", "sleeps."], "label": 0},
}


def run_tool(tool, path, out_dir):
    argv = {"fineweb": ["--input", path, "--out-dir", out_dir, "--workers", "1", "--no-progress"],
            "prepare_dolly": ["--input", path, "--out-dir", out_dir, "--no-progress"],
            # the model is looked up only after the file has been read: a missing one is the next error
            "hellaswag": ["--model", f"{out_dir}/no-model", "--file", path]}[tool]
    module = {"fineweb": fineweb, "prepare_dolly": prepare_dolly, "hellaswag": hellaswag}[tool]
    try:
        run_cli(module.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def good(tool, n=1):
    return b"".join(json.dumps(ROWS[tool]).encode() + b"\n" for _ in range(n))


# (file name, content builder(tool) -> bytes, line named, words of the message)
CASES = [
    ("deep-array.jsonl", lambda t: good(t) + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2, "JSON nested too deeply"),
    ("deep-object.jsonl", lambda t: good(t, 2) + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 3, "JSON nested too deeply"),
    ("latin1.jsonl", lambda t: good(t) + b'{"text": "caf\xe9"}\n', 2, "not UTF-8 (byte 0xe9"),
    ("blank-line.jsonl", lambda t: good(t) + b"\n" + good(t), 2, "blank line"),
    ("spaces-line.jsonl.gz", lambda t: gzip.compress(good(t, 2) + b" \t\r\n" + good(t)), 3, "blank line"),
    ("latin1-after-crlf.jsonl.gz", lambda t: gzip.compress(good(t, 2).replace(b"\n", b"\r\n") + b'"\xff"\n'), 3,
     "not UTF-8 (byte 0xff"),
    ("crlf-then-bad.jsonl", lambda t: good(t, 2).replace(b"\n", b"\r\n") + b'{"text": \n', 3,
     "not valid JSON (Expecting value at column 10)"),
    ("array.jsonl", lambda t: good(t) + b"[1, 2]\n", 2, "expected a JSON object, got array"),
    ("string.jsonl", lambda t: b'"just text"\n', 1, "expected a JSON object, got string"),
    ("null.jsonl", lambda t: good(t, 3) + b"null", 4, "expected a JSON object, got null"),
    ("long-number.jsonl", lambda t: good(t) + b'{"n": ' + b"7" * 5000 + b"}\n", 2, "not valid JSON"),
    ("no-newlines.jsonl", lambda t: good(t) + b'{"text": "' + b"a" * MAX_LINE_BYTES + b'"}\n', 2,
     f"line longer than {MAX_LINE_BYTES >> 20} MiB"),
    ("corrupt.jsonl.gz", lambda t: b"\x1f\x8b\x08\x00" + b"not deflate data" * 4, 1, "cannot read"),
]


@pytest.mark.parametrize("tool", list(ROWS))
@pytest.mark.parametrize("name, content, line, message", CASES, ids=[c[0] for c in CASES])
def test_bad_lines_name_the_line(tmp_path, capsys, tool, name, content, line, message):
    path = tmp_path / name
    path.write_bytes(content(tool))
    assert run_tool(tool, path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}:{line}: {message}"), err[:500]
    assert not (tmp_path / "out").exists()  # nothing written, no folder left behind


@pytest.mark.parametrize("tool", list(ROWS))
def test_random_byte_damage_is_never_a_traceback(tmp_path, capsys, tool):
    """60 copies of a valid file, each with a few bytes replaced, removed or repeated: every run ends
    in a finished output or one error line naming the file, exit 2 (the run ends before the model)."""
    rng = random.Random(tool)
    clean = good(tool, 8)
    for i in range(60):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            choice = rng.choice(["replace", "delete", "repeat"])
            if choice == "replace":
                data[at] = rng.choice(b'{}[]":,\\\n \x00\xff\xc3ab0')
            elif choice == "delete":
                del data[at]
            else:
                data[at:at] = data[at:at + rng.randint(1, 20)] * rng.randint(2, 500)
        path = tmp_path / f"damaged{i}.jsonl"
        path.write_bytes(bytes(data))
        code = run_tool(tool, path, tmp_path / f"out{i}")
        err = capsys.readouterr().err
        if code == 0 and tool != "hellaswag":  # the damage left valid rows: a finished output
            continue
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (bytes(data), err)
        assert str(path) in err or "no-model" in err or "dropped" in err or "held out" in err, (bytes(data), err)
