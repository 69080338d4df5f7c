"""Text -> GPT-2 token shards (llm.c's .bin format) plus a manifest (docs/design.md), and the one shard reader.

    python fineweb.py --out-dir data/fineweb --workers 32          # FineWeb-Edu sample-10BT, streamed (online)
    python fineweb.py --input demo_data/books.jsonl.xz --out-dir data/books --shard-size 10000000
"""

import collections
import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import re

import numpy as np
from tqdm import tqdm

from cli import CLIParser, DefaultsFormatter, bounded, run_cli
from common import UserError, atomic_path, clean_stale_temps, iter_jsonl, open_hub_rows
from tokenizer import EOT_ID, N_VOCAB, get_tokenizer

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"
LOCK = ".fineweb.lock"  # held (flock) by the run writing the folder
SHARD_RE = re.compile(r"^.+_(?P<split>train|val)_\d{6}\.bin$")
DEFAULT_SHARD_SIZE = 100_000_000
VAL_SHARE = 100  # default val: 1/100 of the tokens, capped at one shard, so a small corpus still trains


def write_shard(path, tokens):
    """Write one shard atomically: header [MAGIC, VERSION, n_tokens, 0...] + uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= N_VOCAB):
        raise ValueError(f"token ids must be in [0, {N_VOCAB})")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    return os.fspath(path)


def read_shard(path):
    """Memory-map a shard's tokens: (n_tokens,) uint16. UserError on a bad format or ids >= N_VOCAB."""
    if not os.path.isfile(path):
        raise UserError(f"token shard not found: {path} "
                        f"(fineweb.py --out-dir {os.path.dirname(path) or '.'} makes them)")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS) if size >= HEADER_BYTES else [0, 0]
    if header[0] != MAGIC or header[1] != VERSION:
        raise UserError(f"{path} is not a token shard (llm.c format version {VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise UserError(f"token shard {path} is truncated or corrupt: its header says {n} tokens, "
                        f"the file has {size} bytes")
    tokens = np.memmap(path, np.uint16, "r", HEADER_BYTES, (n,)) if n else np.zeros(0, np.uint16)
    top = int(tokens.max()) if n else 0  # one vectorised pass: a bad id would fail deep in the model
    if top >= N_VOCAB:
        raise UserError(f"token shard {path} holds token id {top}, outside GPT-2's vocabulary (< {N_VOCAB})")
    return tokens


def write_manifest(out_dir, paths):
    """Declare `paths` (shards in out_dir) a finished set: written last, the only list training reads."""
    shards = [{"file": os.path.basename(p), "split": SHARD_RE.match(os.path.basename(p))["split"],
               "tokens": (os.path.getsize(p) - HEADER_BYTES) // 2} for p in paths]
    with atomic_path(os.path.join(out_dir, MANIFEST)) as tmp, open(tmp, "w") as f:
        json.dump({"version": VERSION, "shards": shards}, f, indent=1)


def list_shards(data_dir, split):
    """Paths of one split ('train' | 'val') as the manifest lists them, each checked against its size."""
    manifest = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(manifest):
        raise UserError(f"no {split} shards in {data_dir} (--data-dir): it holds no finished set of token shards (no "
                        f"{MANIFEST}, which fineweb.py writes last); make them with: python fineweb.py --out-dir "
                        f"{data_dir} [--input FILE...]")
    try:
        with open(manifest) as f:
            listed = [(os.path.join(data_dir, s["file"]), HEADER_BYTES + 2 * s["tokens"])
                      for s in json.load(f)["shards"] if s["split"] == split]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest} is not a shard manifest written by fineweb.py") from None
    for path, size in listed:
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise UserError(f"token shard {path} is missing, truncated or corrupt: it does not match "
                            f"{MANIFEST}; make the set again (fineweb.py --overwrite)")
    paths = [path for path, _ in listed]
    if not paths:
        raise UserError(f"no {split} shards in {os.path.join(data_dir, MANIFEST)}")
    return paths


def row_texts(rows, field):
    """The `field` text of each (where, row); a row without one is a UserError naming where."""
    for where, row in rows:
        if not isinstance(row.get(field), str):
            raise UserError(f"{where}: expected a string {field!r} field, got keys {sorted(row)[:8]}")
        yield row[field]


def iter_local_documents(paths, field="text"):
    """Yield the text of every document in the given files, in order."""
    for path in paths:  # main() has checked that they exist
        if re.search(r"\.(jsonl|ndjson)(\.(gz|xz|bz2))?$", path.lower()):
            yield from row_texts(((f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)), field)
        elif path.lower().endswith(".txt"):
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
        elif path.lower().endswith(".parquet"):
            import pyarrow as pa  # only parquet inputs need it
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
                kind = pf.schema_arrow.field(field).type if field in pf.schema_arrow.names else None
                if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    raise UserError(f"{path}: no text column {field!r} "
                                    f"(columns: {', '.join(pf.schema_arrow.names[:8])})")
                for batch in pf.iter_batches(columns=[field], batch_size=1024):
                    yield from (t for t in batch.column(0).to_pylist() if t is not None)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"{path}: cannot read as parquet: {str(e).splitlines()[0]}") from None
        else:
            raise UserError(f"unsupported input {path}: use .jsonl (optionally .gz/.xz/.bz2), .txt or .parquet")


def tokenize_documents(texts):
    """[text, ...] -> one uint16 array: for each document <|endoftext|> then its tokens."""
    enc = get_tokenizer()
    parts = [np.array([EOT_ID] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _chunks(docs, chunk_docs=64, chunk_chars=4_000_000):
    chunk, chars = [], 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= chunk_docs or chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def iter_token_chunks(docs, workers):
    """Tokenize a document stream in order, with `workers` processes (inline when workers <= 1). Documents are
    read in this process (read errors surface as they are); at most 4 * workers chunks are in flight."""
    if workers <= 1:
        yield from map(tokenize_documents, _chunks(docs))
        return
    with mp.Pool(workers) as pool:
        pending = collections.deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(tokenize_documents, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_token_shards(docs, out_dir, prefix="fineweb", shard_size=DEFAULT_SHARD_SIZE, val_tokens=None,
                       max_tokens=None, workers=1, progress=True):
    """Tokenize `docs` (str iterable) into a set of shards and its manifest -> {"shards", "tokens", "documents"}.
    The first tokens wait until the total is known: val takes val_tokens of them, the rest are the last train shard."""
    assert shard_size >= 1 and (val_tokens is None or val_tokens >= 1), "checked by the CLI"
    head_size, head, train, pieces, n, total, n_docs = val_tokens or shard_size, None, [], [], 0, 0, 0

    def add_train(tokens):
        train.append(write_shard(os.path.join(out_dir, f"{prefix}_train_{len(train) + 1:06d}.bin"), tokens))

    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for tokens in iter_token_chunks(docs, workers):
            tokens = tokens[:None if max_tokens is None else max_tokens - total]
            pieces.append(tokens)
            n, total = n + tokens.size, total + tokens.size
            n_docs += int(np.count_nonzero(tokens == EOT_ID))  # each document starts with the only EOT
            while n >= (want := shard_size if head is not None else head_size):
                stream = np.concatenate(pieces)
                pieces, n = [stream[want:]], stream.size - want
                if head is None:
                    head = stream[:want]
                else:
                    add_train(stream[:want])
            bar.update(tokens.size)
            if max_tokens is not None and total >= max_tokens:
                break
    rest = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
    head, rest = (rest, rest[:0]) if head is None else (head, rest)
    if total == 0:
        raise UserError("the input held no documents: nothing to write")
    n_val = val_tokens or min(shard_size, max(1, total // VAL_SHARE))
    if n_val >= total:
        raise UserError(f"the input holds {total:,} tokens: --val-tokens {n_val:,} would leave none to train on; "
                        f"pass a smaller --val-tokens")
    for part in (rest, head[n_val:]):
        if part.size:
            add_train(part)
    shards = [write_shard(os.path.join(out_dir, f"{prefix}_val_000000.bin"), head[:n_val])] + train
    write_manifest(out_dir, shards)
    return {"shards": shards, "tokens": total, "documents": n_docs}


@contextlib.contextmanager
def locked_out_dir(out_dir):
    """Hold out_dir for this run (an flock, which a killed run frees): a second run is refused. On failure, what
    this run made goes (its shards, the folders it created if left empty); nothing that was there before."""
    made, folder = [], os.path.abspath(out_dir)
    while not os.path.isdir(folder):  # the folders this run makes, deepest first
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(out_dir, exist_ok=True)
    lock, fd = os.path.join(out_dir, LOCK), -1
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the run that held it removed it meanwhile
            raise BlockingIOError
    except OSError:
        if fd >= 0:
            os.close(fd)
        raise UserError(f"{out_dir} is being written by another fineweb.py run: wait for it to finish, "
                        f"or choose another --out-dir") from None

    def shards():  # {inode: path}; a shard this run writes is a new file (atomic_path), a new inode
        return {e.inode(): e.path for e in os.scandir(out_dir) if SHARD_RE.match(e.name)}

    before = shards()
    try:
        yield
    except BaseException:
        for path in (path for inode, path in shards().items() if inode not in before):
            os.remove(path)
        raise
    finally:
        os.remove(lock)  # still held: a run that opened it meanwhile finds it unlinked, and stops
        os.close(fd)
        for path in made:
            with contextlib.suppress(OSError):  # only an empty folder goes
                os.rmdir(path)


def build_parser():
    p = CLIParser(description="Tokenize FineWeb-Edu (online) or local text files into GPT-2 token shards "
                              "(llm.c .bin) and a manifest.json listing them.", formatter_class=DefaultsFormatter)
    p.add_argument("--input", nargs="+", metavar="FILE",
                   help="local files (.jsonl[.gz|.xz|.bz2] with a text field, .txt, .parquet) "
                        "(default: stream --dataset from the Hugging Face hub)")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="HF hub dataset")
    p.add_argument("--name", default="sample-10BT", help="HF dataset config name")
    p.add_argument("--split", default="train", help="HF dataset split to stream")
    p.add_argument("--text-field", default="text", help="field / column holding the text")
    p.add_argument("--out-dir", default="data/fineweb", help="where the shards go")
    p.add_argument("--prefix", default="fineweb", help="shard file name prefix")
    p.add_argument("--shard-size", type=bounded(int, 1), default=DEFAULT_SHARD_SIZE, metavar="N",
                   help="tokens per shard")
    p.add_argument("--val-tokens", type=bounded(int, 1), metavar="N",
                   help="tokens in the val shard (default: 1%% of all tokens, at most --shard-size)")
    p.add_argument("--max-tokens", type=bounded(int, 1), metavar="N", help="stop after N tokens (default: all)")
    p.add_argument("--workers", type=bounded(int, 1), default=max(1, (os.cpu_count() or 2) - 1), metavar="N",
                   help="tokenizer processes, 1: in this process (default: CPU cores - 1, here %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for path in args.input or []:
        if not os.path.isfile(path):
            raise UserError(f"input file not found: {path}")
    with locked_out_dir(args.out_dir):
        clean_stale_temps(args.out_dir)
        ours = [n for n in os.listdir(args.out_dir) if SHARD_RE.match(n) or n == MANIFEST]
        if ours and not args.overwrite:
            held = "a finished set of shards" if MANIFEST in ours else "shards of an unfinished run"
            raise UserError(f"{args.out_dir} holds {held}: pass --overwrite to replace them, or choose another "
                            f"--out-dir")
        for name in sorted(ours, key=lambda n: n != MANIFEST):  # the manifest first: no moment leaves a readable mix
            os.remove(os.path.join(args.out_dir, name))
        if args.input:
            docs, source = iter_local_documents(args.input, args.text_field), ", ".join(args.input)
        else:
            rows = open_hub_rows(args.dataset, args.split, name=args.name, streaming=True)  # opened now
            docs = row_texts(((f"{args.dataset} row {i}", row) for i, row in enumerate(rows, 1)), args.text_field)
            source = f"{args.dataset} ({args.name})"
        result = write_token_shards(docs, args.out_dir, args.prefix, args.shard_size, args.val_tokens,
                                    args.max_tokens, args.workers, not args.no_progress)
    print(f"{source}: {result['documents']:,} documents, {result['tokens']:,} tokens -> {len(result['shards'])} "
          f"shard(s) in {args.out_dir} (1 val of {len(read_shard(result['shards'][0])):,} tokens, "
          f"{len(result['shards']) - 1} train)")
    return result


if __name__ == "__main__":
    run_cli(main)
