"""
Text -> GPT-2 token shards in llm.c's .bin format (DESIGN.md "Token shards"), and the one shard reader.

Sources:
- online: FineWeb-Edu from the Hugging Face hub, streamed (`--dataset HuggingFaceFW/fineweb-edu
  --name sample-10BT`, the default when no --input is given);
- local, always: `--input FILE...` with .jsonl / .jsonl.gz / .jsonl.xz (one JSON object a line,
  a string field `text`), .txt (each file is one document) or .parquet (a `text` column).

Every document is written as <|endoftext|> followed by its tokens; documents flow across shard
boundaries, so no token is lost. Shard 0 is `{prefix}_val_000000.bin`, the rest
`{prefix}_train_{index:06d}.bin`. A shard is a header of 256 int32 `[20240520, 1, n_tokens, 0...]`
then n_tokens uint16. Shards are written atomically (temp file + rename): a killed run leaves
only whole shards.

Reading: `read_shard(path)` (memory-mapped uint16 tokens, magic / version / size checked) and
`list_shards(data_dir, split)`; train_gpt2.py uses these, nothing else parses shards.

Tokenization runs in a process pool: the main process reads documents, groups them in chunks and
keeps a bounded number of chunks in flight (ordered results), so reading errors surface in the
main process as one clear line and memory stays flat.

    python fineweb.py --out-dir data/fineweb                      # FineWeb-Edu sample-10BT (online)
    python fineweb.py --input ../shared/data/corpus/standard-ebooks.jsonl.xz \\
        --out-dir data/books --shard-size 10000000
"""

import argparse
import collections
import lzma
import multiprocessing as mp
import os
import re

import numpy as np

from common import UserError, atomic_path, iter_jsonl, run_cli

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
DEFAULT_SHARD_SIZE = 100_000_000
SHARD_RE = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.bin$")


class ShardError(UserError):
    """A token shard that is missing, truncated, or not in llm.c's format."""


# ---------------------------------------------------------------------- shard format (write / read)

def shard_name(prefix, split, index):
    return f"{prefix}_{split}_{index:06d}.bin"


def _write_tokens(f, tokens):
    """Write the token payload (a separate function so tests can interrupt a write half-way)."""
    f.write(tokens.tobytes())


def write_shard(path, tokens):
    """Write one shard atomically: header [MAGIC, VERSION, n_tokens, 0...] + uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.dtype != TOKEN_DTYPE:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
            raise ValueError("token ids must fit in uint16")
        tokens = tokens.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            _write_tokens(f, tokens)
    return path


def read_shard(path):
    """Memory-map a shard's tokens: (n_tokens,) uint16. Any format problem is a ShardError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ShardError(f"token shard not found: {path}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"token shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path} is not a token shard (magic {int(header[0])}, expected {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(f"token shard {path} has version {int(header[1])}; this code reads version {VERSION}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise ShardError(
            f"token shard {path} is truncated or corrupt: its header says {n_tokens} tokens "
            f"({expected} bytes) but the file has {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def list_shards(data_dir, split, prefix=None):
    """Sorted shard paths of one split ('train' | 'val') in data_dir; a clear error when there are none."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise ShardError(f"data directory not found: {data_dir} (make shards with fineweb.py)")
    found = collections.defaultdict(list)
    for name in sorted(os.listdir(data_dir)):
        m = SHARD_RE.match(name)
        if m and m["split"] == split and (prefix is None or m["prefix"] == prefix):
            found[m["prefix"]].append(os.path.join(data_dir, name))
    if not found:
        raise ShardError(f"no {split} shards (*_{split}_NNNNNN.bin) in {data_dir} (make them with fineweb.py)")
    if len(found) > 1:
        raise ShardError(f"{data_dir} holds {split} shards of several prefixes ({', '.join(sorted(found))}); "
                         f"pick one with --data-prefix")
    return next(iter(found.values()))


# ---------------------------------------------------------------------- documents in

def _iter_jsonl(path, field):
    lineno = 0
    try:
        for lineno, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                got = sorted(row)[:8] if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string {field!r} field, got {got}")
            yield row[field]
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        where = f"{path}:{lineno + 1}" if lineno else path
        raise UserError(f"cannot read {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


def _iter_txt(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            yield f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _iter_parquet(path, field):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise UserError(f"{path}: parquet file has no {field!r} column (columns: {', '.join(pf.schema_arrow.names[:8])})")
        if not pa.types.is_string(pf.schema_arrow.field(field).type) and \
                not pa.types.is_large_string(pf.schema_arrow.field(field).type):
            raise UserError(f"{path}: column {field!r} is {pf.schema_arrow.field(field).type}, not text")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None


def iter_local_documents(paths, field="text"):
    """Yield the text of every document in the given files, in order."""
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"input file not found: {path}")
        low = path.lower()
        if low.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz", ".json.gz", ".json.xz", ".ndjson")):
            yield from _iter_jsonl(path, field)
        elif low.endswith(".txt"):
            yield from _iter_txt(path)
        elif low.endswith(".parquet"):
            yield from _iter_parquet(path, field)
        else:
            raise UserError(f"unsupported input {path}: use .jsonl, .jsonl.gz, .jsonl.xz, .txt or .parquet")


def open_hub_documents(dataset, name, split="train", field="text"):
    """Open a streamed Hugging Face hub dataset now (so offline fails at once, as one clear UserError)
    and return an iterator over its documents' text."""
    def fail(e):
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return UserError(f"cannot stream {dataset} ({name}) from the Hugging Face hub: {type(e).__name__}"
                         f"{': ' + msg if msg else ''}. Offline? Give local files with --input")

    try:
        import datasets
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # its retry warnings would add lines before our one-line error
        datasets.logging.set_verbosity_error()
        rows = iter(datasets.load_dataset(dataset, name=name, split=split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # offline, unknown dataset, missing package: one line, no traceback
        raise fail(e) from None

    def documents():
        row = first
        while row is not None:
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{dataset} rows have no string {field!r} field (keys: {sorted(row)[:8]})")
            yield text
            try:
                row = next(rows, None)
            except Exception as e:
                raise fail(e) from None

    return documents()


# ---------------------------------------------------------------------- tokenizing

def tokenize_documents(texts):
    """[text, ...] -> one uint16 array: for each document <|endoftext|> then its tokens."""
    from tokenizer import EOT_ID, get_tokenizer

    enc = get_tokenizer()
    parts = []
    for text in texts:
        parts.append(np.array([EOT_ID], dtype=TOKEN_DTYPE))
        parts.append(np.asarray(enc.encode_ordinary(text), dtype=TOKEN_DTYPE))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def _chunks(docs, chunk_docs, chunk_chars):
    """Group documents into lists of at most chunk_docs documents / about chunk_chars characters."""
    chunk, chars = [], 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= chunk_docs or chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def iter_token_chunks(docs, workers, chunk_docs=64, chunk_chars=4_000_000, in_flight=None):
    """Tokenize a document stream, in order, with `workers` processes (inline when workers <= 1)."""
    chunks = _chunks(docs, chunk_docs, chunk_chars)
    if workers <= 1:
        for chunk in chunks:
            yield tokenize_documents(chunk)
        return
    in_flight = in_flight or 4 * workers
    with mp.Pool(workers) as pool:
        pending = collections.deque()
        for chunk in chunks:  # read here, in the main process: reading errors surface as they are
            pending.append(pool.apply_async(tokenize_documents, (chunk,)))
            if len(pending) >= in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Cut a token stream into shards: shard 0 (val) holds val_tokens, the others shard_size."""

    def __init__(self, out_dir, prefix, shard_size, val_tokens=None):
        if shard_size < 1:
            raise UserError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.val_tokens = shard_size if val_tokens is None else val_tokens
        if self.val_tokens < 1:
            raise UserError(f"--val-tokens must be >= 1, got {self.val_tokens}")
        self.buffer = np.empty(max(self.shard_size, self.val_tokens), dtype=TOKEN_DTYPE)
        self.fill = 0
        self.index = 0
        self.written = []  # paths

    def _capacity(self):
        return self.val_tokens if self.index == 0 else self.shard_size

    def add(self, tokens):
        while tokens.size:
            take = min(tokens.size, self._capacity() - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self._capacity():
                self._flush()

    def _flush(self):
        if self.fill == 0:
            return
        split = "val" if self.index == 0 else "train"
        path = os.path.join(self.out_dir, shard_name(self.prefix, split, self.index))
        write_shard(path, self.buffer[:self.fill])
        self.written.append(path)
        self.index += 1
        self.fill = 0

    def close(self):
        self._flush()
        return self.written


def remove_stale_shards(out_dir, prefix, keep):
    """Delete shards of this prefix left by an earlier, longer run (they would mix with the new ones)."""
    keep = {os.path.abspath(p) for p in keep}
    removed = []
    for name in os.listdir(out_dir):
        m = SHARD_RE.match(name)
        path = os.path.abspath(os.path.join(out_dir, name))
        if m and m["prefix"] == prefix and path not in keep:
            os.remove(path)
            removed.append(name)
    return sorted(removed)


def write_token_shards(docs, out_dir, prefix="fineweb", shard_size=DEFAULT_SHARD_SIZE, val_tokens=None,
                       max_tokens=None, workers=1, progress=True):
    """Tokenize `docs` (an iterable of str) into shards; returns {"shards": [...], "tokens": n, "documents": n}."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, prefix, shard_size, val_tokens)
    total = 0
    n_docs = 0

    def counted(stream):
        nonlocal n_docs
        for text in stream:
            n_docs += 1
            yield text

    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress,
               smoothing=0.1)
    with bar:
        for tokens in iter_token_chunks(counted(docs), workers):
            if max_tokens is not None and total + tokens.size > max_tokens:
                tokens = tokens[:max_tokens - total]
            writer.add(tokens)
            total += tokens.size
            bar.update(tokens.size)
            bar.set_postfix(docs=n_docs, shards=len(writer.written), refresh=False)
            if max_tokens is not None and total >= max_tokens:
                break
        shards = writer.close()
    if not shards:
        raise UserError("the input held no documents: nothing to write")
    removed = remove_stale_shards(out_dir, prefix, shards)
    return {"shards": shards, "tokens": total, "documents": n_docs, "removed": removed}


# ---------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(
        description="Tokenize FineWeb-Edu (online) or local text files into GPT-2 token shards (llm.c .bin).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", metavar="FILE",
                   help="local files (.jsonl/.jsonl.gz/.jsonl.xz with a text field, .txt, .parquet); "
                        "without it the dataset is streamed from the Hugging Face hub")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="HF hub dataset (online only)")
    p.add_argument("--name", default="sample-10BT", help="HF dataset config name")
    p.add_argument("--split", default="train", help="HF dataset split to stream")
    p.add_argument("--text-field", default="text", help="field / column holding the document text")
    p.add_argument("--out-dir", default="data/fineweb", help="where the shards go")
    p.add_argument("--prefix", default="fineweb", help="shard file name prefix")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="tokens in the val shard (shard 0); default: --shard-size")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (1: tokenize in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.input:
        missing = [f for f in args.input if not os.path.isfile(f)]
        if missing:
            raise UserError(f"input file not found: {missing[0]}")
        docs = iter_local_documents(args.input, args.text_field)
        source = ", ".join(args.input)
    else:
        docs = open_hub_documents(args.dataset, args.name, args.split, args.text_field)
        source = f"{args.dataset} ({args.name})"
    result = write_token_shards(docs, args.out_dir, args.prefix, args.shard_size, args.val_tokens,
                                args.max_tokens, args.workers, progress=not args.no_progress)
    if result["removed"]:
        print(f"removed {len(result['removed'])} stale shard(s) of an earlier run: {', '.join(result['removed'][:4])}")
    print(f"{source}: {result['documents']:,} documents, {result['tokens']:,} tokens -> "
          f"{len(result['shards'])} shard(s) in {args.out_dir} (1 val, {len(result['shards']) - 1} train)")
    return result


if __name__ == "__main__":
    run_cli(main)
