"""Prepare instruction-tuning data (databricks-dolly-15k schema) for finetune_dolly.py.

Source: `databricks/databricks-dolly-15k` (split `train`) from the Hugging Face hub when no
`--input` is given, or a local file of the same schema: `.jsonl` (one object a line; blank
lines skipped), `.json` (a JSON array of objects), either one compressed as `.xz`, `.gz` or
`.bz2`. Each row is an object with string fields `instruction`, `context`, `response`,
`category` (`context` may be empty; other fields are ignored). A row that breaks this stops
the run with an error naming the line (or array item) and field.

Cleaning, applied to `instruction`, `context`, `response` and `category` (see normalize_text):
  1. Unicode NFC.
  2. Newlines: `\\r\\n`, `\\r`, U+2028, U+2029 and U+0085 become `\\n`.
  3. Within each line, every run of other whitespace (spaces, tabs, no-break and thin
     spaces, ...) after the first non-space character becomes one ASCII space; the line's
     leading indentation is kept as is (code and nested lists need it); trailing
     whitespace is removed.
  4. Runs of two or more blank lines become one blank line (paragraph breaks are kept).
  5. The whole field is stripped.
Then rows are dropped, each counted under the first reason that applies, in this order:
`empty_instruction`, `empty_response`, `duplicate` (same instruction, context and response
after cleaning as an earlier row; the first one is kept; category is not compared) and
`too_long` (the whole templated example, closing <|endoftext|> included, has more than
`--max-len` tokens).

Split: stratified by category, seeded. In each category (shuffled by a generator seeded from
(seed, crc32(category)), so one category's split does not depend on the others) round(n * F)
rows go to val, at least 1 when F > 0 and the category has 2 or more rows, and at least 1
row always stays in train. Examples keep the input order within each split (finetune_dolly.py
shuffles every epoch). Default F = 0.05: about 750 of Dolly's 15,011 rows, enough for a val
loss with little noise (~100k response tokens) and a few held-out prompts per category, while
95% of the (small) data set still trains.

Tokenization: tokens = encode(format_prompt(instruction, context)) + encode(response) +
[EOT_ID]. The prompt and the response are encoded separately and concatenated, never as one
string: inference encodes the prompt string alone (it ends with '### Response:\\n') and the
model continues from there, so training sees exactly the prompt tokens inference feeds, and
the prompt/response boundary is exact (no BPE merge can straddle it). loss_mask is 0 on the
prompt tokens and 1 on the response tokens and the closing <|endoftext|>.

Output (contract in DESIGN.md, "Instruction data"): {out}/train.npz and {out}/val.npz
(np.savez; `tokens` uint16, all examples concatenated; `loss_mask` uint8; `offsets` int64,
n_examples + 1, example i is tokens[offsets[i]:offsets[i+1]]) and {out}/meta.json. Read a
split with load_split(path). All three files are written to temp files first and renamed only
when all are complete, meta.json last; a failure leaves no partial file behind.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import lzma
import os
import re
import unicodedata
import zlib

import numpy as np
from tqdm import tqdm

from common import UserError, atomic_path, open_compressed, run_cli
from prompt import TEMPLATE_VERSION, format_prompt
from tokenizer import EOT_ID, EOT_TOKEN, N_VOCAB, get_tokenizer

HF_DATASET = "databricks/databricks-dolly-15k"
FIELDS = ("instruction", "context", "response", "category")
DROP_REASONS = ("empty_instruction", "empty_response", "duplicate", "too_long")
SPLITS = ("train", "val")
SPLIT_DTYPES = {"tokens": np.dtype(np.uint16), "loss_mask": np.dtype(np.uint8), "offsets": np.dtype(np.int64)}
FORMAT_VERSION = 1
TOKENIZER_NAME = "gpt2 (tiktoken r50k_base ranks, <|endoftext|>=50256)"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_MAX_LEN = 1024  # GPT-2's context length
DEFAULT_SEED = 1337
TOKENIZE_CHUNK = 2048  # rows per encode_ordinary_batch call (one progress-bar step)

_JSON_TYPE_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
                    list: "array", dict: "object"}


# ---------------------------------------------------------------------------------------------
# Reading and schema check


def _type_name(value):
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def validate_row(obj, where):
    """One input record -> dict of the four string fields; UserError naming `where` and the field."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {_type_name(obj)}")
    row = {}
    for field in FIELDS:
        if field not in obj:
            raise UserError(f'{where}: field "{field}" is missing')
        value = obj[field]
        if not isinstance(value, str):
            raise UserError(f'{where}: field "{field}" must be a string, got {_type_name(value)}')
        row[field] = value
    return row


def _inner_suffix(path):
    """'.jsonl' or '.json' (after removing a compression suffix), else UserError."""
    base = re.sub(r"\.(xz|gz|bz2)$", "", path)
    for suffix in (".jsonl", ".json"):
        if base.endswith(suffix):
            return suffix
    raise UserError(f"{path}: unsupported file type; use .jsonl or .json (a JSON array), "
                    "optionally compressed as .xz, .gz or .bz2")


def _iter_jsonl(f, path):
    """Yield (where, obj) for each non-blank line of an open binary .jsonl file."""
    for lineno, raw in enumerate(f, 1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield where, obj


def _iter_json_array(f, path):
    """Yield (where, obj) for each item of a .json file holding one array; where names the item (1-based)."""
    try:
        data = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of row objects, got {_type_name(data)}"
                        " (for one object a line, name the file .jsonl)")
    for i, obj in enumerate(data, 1):
        yield f"{path} item {i}", obj


def read_file_rows(path, limit=None):
    """Rows (dicts of the four string fields) of a local .jsonl/.json file (optionally compressed).

    limit: read only the first `limit` rows. UserError on a missing file, bad JSON, a schema
    violation (naming line/item and field) or a file with no rows.
    """
    suffix = _inner_suffix(path)
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}")
    rows = []
    try:
        with open_compressed(path, "rb") as f:
            records = _iter_jsonl(f, path) if suffix == ".jsonl" else _iter_json_array(f, path)
            for where, obj in records:
                if limit is not None and len(rows) >= limit:
                    break
                rows.append(validate_row(obj, where))
    except (OSError, EOFError, lzma.LZMAError) as e:  # corrupt or truncated archive, unreadable file
        raise UserError(f"{path}: cannot read: {e}") from None
    if not rows:
        raise UserError(f"{path}: no rows (the file is empty)")
    return rows


def read_hub_rows(limit=None, name=HF_DATASET):
    """Rows of `name` (split train) from the Hugging Face hub; UserError (suggesting --input) when unreachable."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading {name} needs the `datasets` package (pip install datasets); "
                        "or pass a local copy with --input FILE.jsonl") from None
    print(f"loading {name} from the Hugging Face hub (offline? pass a local copy with --input FILE.jsonl)",
          flush=True)
    hub_logger = logging.getLogger("huggingface_hub")
    old_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its per-retry warnings would bury the one-line error
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, auth, missing dataset: all mean "use a local file"
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"could not load {name} from the Hugging Face hub ({type(e).__name__}: {msg}); "
                        "pass a local copy with --input FILE.jsonl") from None
    finally:
        hub_logger.setLevel(old_level)
    rows = []
    for i, obj in enumerate(ds, 1):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(validate_row(obj, f"{name} row {i}"))
    if not rows:
        raise UserError(f"{name}: no rows")
    return rows


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cleaning

_NEWLINES = re.compile(r"\r\n|[\r\u2028\u2029\x85]")
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")  # whitespace runs after a non-space character
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text):
    """NFC; newlines unified to \\n; in-line whitespace runs -> one space (indentation kept);
    trailing spaces removed; 2+ blank lines -> 1; stripped. See the module docstring."""
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def clean_rows(rows):
    """Normalise every row; drop empty instructions/responses and duplicates.

    Returns (kept rows, drop counts for those reasons). too_long is decided after tokenizing.
    """
    drops = dict.fromkeys(DROP_REASONS, 0)
    seen = set()
    kept = []
    for row in rows:
        row = {field: normalize_text(row[field]) for field in FIELDS}
        key = (row["instruction"], row["context"], row["response"])
        if not row["instruction"]:
            drops["empty_instruction"] += 1
        elif not row["response"]:
            drops["empty_response"] += 1
        elif key in seen:
            drops["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, drops


# ---------------------------------------------------------------------------------------------
# Tokenizing and splitting


def tokenize_rows(rows, progress=True):
    """(prompt ids, response ids) per row: prompt and response encoded separately (see module docstring)."""
    enc = get_tokenizer()
    out = []
    with tqdm(total=len(rows), desc="tokenizing", unit="rows", disable=not progress) as bar:
        for start in range(0, len(rows), TOKENIZE_CHUNK):
            chunk = rows[start:start + TOKENIZE_CHUNK]
            prompts = enc.encode_ordinary_batch([format_prompt(r["instruction"], r["context"]) for r in chunk])
            responses = enc.encode_ordinary_batch([r["response"] for r in chunk])
            out.extend(zip(prompts, responses))
            bar.update(len(chunk))
    return out


def n_val_rows(n, val_fraction):
    """Val rows for a category of n rows: round(n*F), >= 1 when F > 0 and n >= 2, and <= n-1."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(max(int(np.floor(n * val_fraction + 0.5)), 1), n - 1)


def stratified_split(categories, val_fraction, seed):
    """Indices (train, val), each sorted, of a split stratified by category.

    categories: sequence of category names (one per example).
    """
    by_cat = {}
    for i, cat in enumerate(categories):
        by_cat.setdefault(cat, []).append(i)
    train, val = [], []
    for cat, idx in by_cat.items():
        rng = np.random.default_rng([seed, zlib.crc32(cat.encode("utf-8"))])
        perm = rng.permutation(len(idx))
        k = n_val_rows(len(idx), val_fraction)
        val.extend(idx[j] for j in perm[:k])
        train.extend(idx[j] for j in perm[k:])
    return sorted(train), sorted(val)


def build_split(examples):
    """[(prompt ids, response ids)] -> {"tokens" uint16 (N,), "loss_mask" uint8 (N,), "offsets" int64 (n+1,)}."""
    prompt_len = np.array([len(p) for p, _ in examples], dtype=np.int64)  # (n,)
    target_len = np.array([len(r) + 1 for _, r in examples], dtype=np.int64)  # (n,) response + EOT
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(prompt_len + target_len, out=offsets[1:])
    flat = []
    for p, r in examples:
        flat.extend(p)
        flat.extend(r)
        flat.append(EOT_ID)
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= N_VOCAB):
        raise AssertionError("token id outside the GPT-2 vocabulary")
    # 0 over each prompt, 1 over each response + EOT: repeat [0, 1, 0, 1, ...] by [p0, t0, p1, t1, ...]
    counts = np.stack([prompt_len, target_len], axis=1).reshape(-1)  # (2n,)
    loss_mask = np.repeat(np.tile(np.array([0, 1], dtype=np.uint8), len(examples)), counts)
    return {"tokens": tokens.astype(np.uint16), "loss_mask": loss_mask, "offsets": offsets}


# ---------------------------------------------------------------------------------------------
# Reading and writing the output format


def check_split(data, name="split"):
    """Validate a split dict (keys, dtypes, shapes, offsets, mask, closing EOT); UserError naming `name`."""
    missing = [k for k in SPLIT_DTYPES if k not in data]
    if missing:
        raise UserError(f"{name}: missing array(s) {', '.join(missing)}; expected {', '.join(SPLIT_DTYPES)}")
    for key, dtype in SPLIT_DTYPES.items():
        arr = data[key]
        if arr.dtype != dtype or arr.ndim != 1:
            raise UserError(f"{name}: {key} must be a 1-D {dtype} array, got {arr.ndim}-D {arr.dtype}")
    tokens, mask, offsets = data["tokens"], data["loss_mask"], data["offsets"]
    if len(mask) != len(tokens):
        raise UserError(f"{name}: loss_mask has {len(mask)} entries but tokens has {len(tokens)}")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise UserError(f"{name}: offsets must start at 0 and end at len(tokens) = {len(tokens)}")
    if np.any(np.diff(offsets) < 2):
        raise UserError(f"{name}: offsets must increase by at least 2 (a response token and <|endoftext|>)")
    if mask.size and mask.max() > 1:
        raise UserError(f"{name}: loss_mask must hold only 0 and 1")
    if tokens.size and tokens.max() >= N_VOCAB:
        raise UserError(f"{name}: token ids must be < {N_VOCAB}")
    ends = offsets[1:] - 1
    if np.any(tokens[ends] != EOT_ID) or np.any(mask[ends] != 1):
        raise UserError(f"{name}: every example must end with {EOT_TOKEN} under loss_mask 1")


def load_split(path):
    """Load and validate a train.npz / val.npz written by this script.

    Returns {"tokens": uint16 (N,), "loss_mask": uint8 (N,), "offsets": int64 (n_examples+1,)};
    example i is tokens[offsets[i]:offsets[i+1]], trained where loss_mask is 1. UserError on a
    missing or malformed file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (write it with prepare_dolly.py --out-dir DIR)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise UserError(f"{path}: not a valid instruction-data .npz ({type(e).__name__}: {e})") from None
    check_split(data, path)
    return {key: data[key] for key in SPLIT_DTYPES}


def write_outputs(out_dir, splits, meta):
    """Write {out_dir}/train.npz, val.npz, meta.json: all to temp files first, renamed only when all
    are written (meta.json last), so a failure leaves no partial or mismatched file."""
    with contextlib.ExitStack() as stack:
        # ExitStack exits (renames) in reverse order of entry: train, val, then meta.json.
        tmp_meta = stack.enter_context(atomic_path(os.path.join(out_dir, "meta.json")))
        tmps = {name: stack.enter_context(atomic_path(os.path.join(out_dir, f"{name}.npz")))
                for name in reversed(SPLITS)}
        for name, tmp in tmps.items():
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, **splits[name])
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")


# ---------------------------------------------------------------------------------------------
# Statistics and summary


def _dist(values):
    """mean/median/p95/max of a list of counts (None when empty)."""
    if len(values) == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 1), "median": float(np.median(v)),
            "p95": round(float(np.percentile(v, 95)), 1), "max": int(v.max())}


def split_stats(data):
    """Token statistics of one split: examples, tokens, trained tokens, length distributions."""
    lengths = np.diff(data["offsets"])
    trained = np.add.reduceat(data["loss_mask"].astype(np.int64), data["offsets"][:-1]) if len(lengths) else []
    return {"examples": int(len(lengths)), "tokens": int(len(data["tokens"])),
            "response_tokens": int(data["loss_mask"].sum()),
            "example_len": _dist(lengths), "response_len": _dist(trained)}


def format_summary(meta):
    """The human-readable summary printed at the end of a run."""
    rows = meta["rows"]
    lines = [f"source: {meta['source']['name']}",
             f"rows: {rows['read']:,} read, {rows['kept']:,} kept, {rows['read'] - rows['kept']:,} dropped ("
             + ", ".join(f"{k} {v:,}" for k, v in rows["dropped"].items()) + ")",
             f"split: train {rows['train']:,}, val {rows['val']:,} "
             f"(stratified by category, val fraction {meta['val_fraction']}, seed {meta['seed']})",
             f"tokens (max_len {meta['max_len']}; response = trained tokens incl. <|endoftext|>):",
             f"  {'':<26}{'train':>12}{'val':>12}"]
    stats = meta["token_stats"]

    def cell(fn):
        return "".join(f"{(fn(stats[s]) if stats[s]['examples'] else '-'):>12}" for s in SPLITS)

    lines.append(f"  {'tokens total':<26}" + cell(lambda s: f"{s['tokens']:,}"))
    lines.append(f"  {'response tokens total':<26}" + cell(lambda s: f"{s['response_tokens']:,}"))
    for dist in ("example_len", "response_len"):
        for q in ("mean", "median", "p95", "max"):
            label = f"{'example' if dist == 'example_len' else 'response'} length {q}"
            lines.append(f"  {label:<26}" + cell(lambda s, d=dist, q=q: f"{s[d][q]:g}"))
    lines.append(f"  {'category':<26}{'train':>12}{'val':>12}")
    for cat, counts in meta["categories"].items():
        lines.append(f"  {cat or '(empty)':<26}{counts['train']:>12,}{counts['val']:>12,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The pipeline


def prepare(rows, out_dir, source, val_fraction=DEFAULT_VAL_FRACTION, max_len=DEFAULT_MAX_LEN,
            seed=DEFAULT_SEED, progress=True):
    """Clean, tokenize, split and write `rows` (dicts of the four fields) to out_dir; returns meta.

    UserError when every row is dropped; nothing is written then.
    """
    kept, drops = clean_rows(rows)
    encoded = tokenize_rows(kept, progress=progress) if kept else []
    examples, cats = [], []
    for row, (p, r) in zip(kept, encoded):
        if len(p) + len(r) + 1 > max_len:
            drops["too_long"] += 1
        else:
            examples.append((p, r))
            cats.append(row["category"])
    if not examples:
        raise UserError(f"all {len(rows):,} rows were dropped ("
                        + ", ".join(f"{k} {v:,}" for k, v in drops.items() if v)
                        + f"); nothing written (check the input, or raise --max-len from {max_len})")
    train_idx, val_idx = stratified_split(cats, val_fraction, seed)
    index = {"train": train_idx, "val": val_idx}
    splits = {name: build_split([examples[i] for i in idx]) for name, idx in index.items()}
    for name, data in splits.items():
        check_split(data, name)
    categories = {}
    for cat in sorted(set(cats)):
        categories[cat] = {name: sum(1 for i in idx if cats[i] == cat) for name, idx in index.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "rows": {"read": len(rows), "kept": len(examples), "dropped": drops,
                 "train": len(train_idx), "val": len(val_idx)},
        "template_version": TEMPLATE_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "eot_id": EOT_ID,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_len": max_len,
        "stratify_by": "category",
        "token_stats": {name: split_stats(data) for name, data in splits.items()},
        "categories": categories,
    }
    write_outputs(out_dir, splits, meta)
    return meta


def build_parser():
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Clean, tokenize and split instruction data (databricks-dolly-15k schema: instruction,\n"
                    "context, response, category) into {out}/train.npz, val.npz and meta.json for\n"
                    "finetune_dolly.py. Loss mask: 1 on the response and its closing <|endoftext|>.",
        epilog="example:\n  python prepare_dolly.py --input ../shared/data/wiki-instructions.jsonl.xz "
               "--out-dir data/dolly",
    )
    p.add_argument("--input", metavar="FILE", help="local .jsonl or .json (array) file, optionally .xz/.gz/.bz2; "
                   f"default: {HF_DATASET} (split train) from the Hugging Face hub, which needs network")
    p.add_argument("--out-dir", metavar="DIR", default="data/dolly", help="output folder (default: %(default)s)")
    p.add_argument("--val-fraction", metavar="F", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of each category held out for validation, 0 <= F < 1 (default: %(default)s)")
    p.add_argument("--max-len", metavar="N", type=int, default=DEFAULT_MAX_LEN,
                   help="drop examples longer than N tokens, prompt + response + <|endoftext|> "
                        "(default: %(default)s, GPT-2's context)")
    p.add_argument("--seed", metavar="S", type=int, default=DEFAULT_SEED,
                   help="seed of the train/val split (default: %(default)s)")
    p.add_argument("--limit", metavar="N", type=int, help="use only the first N input rows (quick runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args):
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_len < 2:
        raise UserError(f"--max-len must be at least 2, got {args.max_len}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.input:
        rows = read_file_rows(args.input, args.limit)
        source = {"type": "file", "name": args.input, "path": os.path.abspath(args.input),
                  "sha256": _sha256(args.input)}
    else:
        rows = read_hub_rows(args.limit)
        source = {"type": "huggingface", "name": HF_DATASET, "split": "train"}
    source["limit"] = args.limit
    meta = prepare(rows, args.out_dir, source, val_fraction=args.val_fraction, max_len=args.max_len,
                   seed=args.seed, progress=not args.no_progress)
    print(format_summary(meta))
    print(f"wrote {', '.join(os.path.join(args.out_dir, n) for n in ('train.npz', 'val.npz', 'meta.json'))}")
    return meta


if __name__ == "__main__":
    run_cli(main)
