"""Clean, tokenize and split instruction data (databricks-dolly-15k's schema) for finetune_dolly.py (README,
step 3). An example is encode(format_prompt(instruction, context)) + encode(response) + [EOT], encoded apart:
training sees exactly the prompt tokens inference feeds, and no BPE merge straddles the boundary.
"""

import contextlib
import hashlib
import itertools
import json
import os
import re
import unicodedata
import zlib

import numpy as np
from tqdm import tqdm

from cli import CLIParser, DefaultsFormatter, bounded, run_cli
from common import UserError, atomic_path, iter_jsonl, json_type, open_hub_rows
from prompt import TEMPLATE_VERSION, format_prompt
from tokenizer import EOT_ID, EOT_TOKEN, N_VOCAB, get_tokenizer

HF_DATASET = "databricks/databricks-dolly-15k"
FIELDS = ("instruction", "context", "response", "category")
DROP_REASONS = ("empty_instruction", "empty_response", "duplicate", "too_long")
SPLITS = ("train", "val")
SPLIT_DTYPES = {"tokens": np.dtype(np.uint16), "loss_mask": np.dtype(np.uint8), "offsets": np.dtype(np.int64)}
DEFAULT_VAL_FRACTION = 0.05  # ~750 of Dolly's 15,011 rows: a low-noise val loss, 95% still trains
DEFAULT_MAX_LEN = 1024  # GPT-2's context length


def validate_row(obj, where):
    """One input record -> dict of the four string fields; UserError naming `where` and the field."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {json_type(obj)}")
    for field in FIELDS:
        if field not in obj:
            raise UserError(f'{where}: field "{field}" is missing')
        if not isinstance(obj[field], str):
            raise UserError(f'{where}: field "{field}" must be a string, got {json_type(obj[field])}')
    return {field: obj[field] for field in FIELDS}


def read_file_rows(path, limit=None):
    """Rows of a local .jsonl file, optionally .xz/.gz/.bz2; UserError on any problem."""
    if not re.search(r"\.jsonl(\.(xz|gz|bz2))?$", path):
        raise UserError(f"{path}: unsupported file type; use .jsonl, optionally compressed as .xz, .gz or .bz2")
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}")
    records = itertools.islice(iter_jsonl(path), limit)
    rows = [validate_row(obj, f"{path}:{lineno}") for lineno, obj in records]
    if not rows:
        raise UserError(f"{path}: no rows (the file is empty)")
    return rows


_NEWLINES = re.compile(r"\r\n|[\r\u2028\u2029\x85]")
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")  # whitespace runs after a non-space: indentation is kept
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text):
    """NFC; newlines unified to \\n; in-line whitespace runs (no-break and thin spaces too) -> one space,
    leading indentation kept (code and lists need it); trailing spaces removed; 2+ blank lines -> 1; stripped."""
    text = _NEWLINES.sub("\n", unicodedata.normalize("NFC", text))
    text = _INNER_SPACE.sub(" ", _TRAILING_SPACE.sub("", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def clean_rows(rows):
    """(kept rows, drop counts): rows normalised; empty instructions/responses and duplicates dropped."""
    drops, seen, kept = dict.fromkeys(DROP_REASONS, 0), set(), []
    for row in rows:
        row = {field: normalize_text(row[field]) for field in FIELDS}
        key = (row["instruction"], row["context"], row["response"])
        reason = ("empty_instruction" if not row["instruction"] else "empty_response" if not row["response"]
                  else "duplicate" if key in seen else None)
        if reason:
            drops[reason] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, drops


def tokenize_rows(rows, progress=True, chunk=2048):
    """(prompt ids, response ids) per row, prompt and response encoded separately (see the module docstring)."""
    enc, out = get_tokenizer(), []
    for start in tqdm(range(0, len(rows), chunk), desc="tokenizing", unit="chunk", disable=not progress):
        part = rows[start:start + chunk]
        prompts = enc.encode_ordinary_batch([format_prompt(r["instruction"], r["context"]) for r in part])
        out.extend(zip(prompts, enc.encode_ordinary_batch([r["response"] for r in part])))
    return out


def stratified_split(categories, val_fraction, seed):
    """Sorted (train, val) indices; each category shuffled by its own generator (independent of the others)."""
    by_cat = {}
    for i, cat in enumerate(categories):
        by_cat.setdefault(cat, []).append(i)
    val = []
    for cat, idx in by_cat.items():
        # round(n F) val rows, at least 1 and at most n - 1: a category of 2+ rows is in both splits
        k = min(max(int(len(idx) * val_fraction + 0.5), 1), len(idx) - 1) if val_fraction > 0 else 0
        val += np.random.default_rng([seed, zlib.crc32(cat.encode("utf-8"))]).permutation(idx)[:k].tolist()
    return sorted(set(range(len(categories))) - set(val)), sorted(val)


def build_split(examples):
    """[(prompt ids, response ids)] -> {"tokens" uint16 (N,), "loss_mask" uint8 (N,), "offsets" int64 (n+1,)}."""
    prompt_len = np.array([len(p) for p, _ in examples], dtype=np.int64)
    target_len = np.array([len(r) + 1 for _, r in examples], dtype=np.int64)  # response + EOT
    offsets = np.concatenate([[0], np.cumsum(prompt_len + target_len)]).astype(np.int64)
    tokens = np.array([t for p, r in examples for t in (*p, *r, EOT_ID)], dtype=np.uint16)
    # 0 over each prompt, 1 over each response + EOT: repeat [0, 1, 0, 1, ...] by [p0, t0, p1, t1, ...]
    loss_mask = np.repeat(np.tile(np.array([0, 1], np.uint8), len(examples)),
                          np.stack([prompt_len, target_len], axis=1).reshape(-1))
    return {"tokens": tokens, "loss_mask": loss_mask, "offsets": offsets}


def load_split(path):
    """Load and validate a train.npz / val.npz (keys, dtypes, offsets, mask, closing EOT): {"tokens", "loss_mask",
    "offsets"}; UserError naming the file when malformed."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; make it with: python prepare_dolly.py "
                        f"--out-dir {os.path.dirname(path) or '.'} [--input FILE]")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise UserError(f"{path}: not a valid instruction-data .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in SPLIT_DTYPES if k not in data]
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)}; expected {', '.join(SPLIT_DTYPES)}")
    for key, dtype in SPLIT_DTYPES.items():
        if data[key].dtype != dtype or data[key].ndim != 1:
            raise UserError(f"{path}: {key} must be a 1-D {dtype} array, got {data[key].ndim}-D {data[key].dtype}")
    tokens, mask, offsets = data["tokens"], data["loss_mask"], data["offsets"]
    problems = [
        (len(mask) != len(tokens), f"loss_mask has {len(mask)} entries but tokens has {len(tokens)}"),
        (len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens),
         f"offsets must start at 0 and end at len(tokens) = {len(tokens)}"),
        (np.any(np.diff(offsets) < 2), "offsets must increase by at least 2 (a response token and <|endoftext|>)"),
        (mask.size and mask.max() > 1, "loss_mask must hold only 0 and 1"),
        (tokens.size and tokens.max() >= N_VOCAB, f"token ids must be < {N_VOCAB}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(f"{path}: {message}")
    ends = offsets[1:] - 1
    if np.any(tokens[ends] != EOT_ID) or np.any(mask[ends] != 1):
        raise UserError(f"{path}: every example must end with {EOT_TOKEN} under loss_mask 1")
    return {key: data[key] for key in SPLIT_DTYPES}


def split_stats(data):
    lengths = np.diff(data["offsets"])
    return {"examples": len(lengths), "tokens": len(data["tokens"]), "response_tokens": int(data["loss_mask"].sum()),
            "example_len": {"mean": round(float(lengths.mean()), 1), "p95": float(np.percentile(lengths, 95)),
                            "max": int(lengths.max())} if len(lengths) else None}


def format_summary(meta):
    rows, stats = meta["rows"], meta["token_stats"]
    lines = [f"source: {meta['source']['name']}",
             f"rows: {rows['read']:,} read, {rows['kept']:,} kept, {rows['read'] - rows['kept']:,} dropped ("
             + ", ".join(f"{k} {v:,}" for k, v in rows["dropped"].items()) + ")",
             f"split (by category, val fraction {meta['val_fraction']}, seed {meta['seed']}):",
             f"  {'':<24}{'examples':>10}{'tokens':>12}{'trained':>12}  example length mean / p95 / max"]
    for s in SPLITS:
        lengths = stats[s]["example_len"] or {}
        lines.append(f"  {s:<24}{stats[s]['examples']:>10,}{stats[s]['tokens']:>12,}"
                     f"{stats[s]['response_tokens']:>12,}  {' / '.join(f'{v:g}' for v in lengths.values()) or '-'}")
    lines += [f"  {cat or '(empty)':<24}{n['train']:>10,} train {n['val']:>6,} val"
              for cat, n in meta["categories"].items()]
    return "\n".join(lines)


def prepare(rows, out_dir, source, val_fraction=DEFAULT_VAL_FRACTION, max_len=DEFAULT_MAX_LEN, seed=1337,
            progress=True):
    """Clean, tokenize, split and write `rows` (dicts of the four fields) to out_dir -> meta. UserError, with
    nothing written, when every row is dropped or no row can be held out for val."""
    kept, drops = clean_rows(rows)
    examples, cats = [], []
    for row, (p, r) in zip(kept, tokenize_rows(kept, progress) if kept else []):
        if len(p) + len(r) + 1 > max_len:
            drops["too_long"] += 1
        else:
            examples.append((p, r))
            cats.append(row["category"])
    if not examples:
        raise UserError(f"all {len(rows):,} rows were dropped ("
                        + ", ".join(f"{k} {v:,}" for k, v in drops.items() if v)
                        + f"); nothing written (check the input, or raise --max-len from {max_len})")
    index = dict(zip(SPLITS, stratified_split(cats, val_fraction, seed)))
    if val_fraction > 0 and not index["val"]:
        raise UserError(f"no row can be held out for validation: every category has fewer than 2 of the "
                        f"{len(examples)} kept rows; pass --val-fraction 0 to train without a val split")
    splits = {name: build_split([examples[i] for i in idx]) for name, idx in index.items()}
    meta = {
        "format_version": 1, "source": source,
        "rows": {"read": len(rows), "kept": len(examples), "dropped": drops,
                 **{name: len(idx) for name, idx in index.items()}},
        "template_version": TEMPLATE_VERSION, "tokenizer": "gpt2 (tiktoken r50k_base ranks)", "eot_id": EOT_ID,
        "seed": seed, "val_fraction": val_fraction, "max_len": max_len, "stratify_by": "category",
        "token_stats": {name: split_stats(data) for name, data in splits.items()},
        "categories": {cat: {name: sum(cats[i] == cat for i in idx) for name, idx in index.items()}
                       for cat in sorted(set(cats))},
    }
    # train.npz, val.npz, meta.json: all written to temp files, renamed only when all are complete; the stack
    # exits (renames) in reverse order of entry: meta.json last
    with contextlib.ExitStack() as stack:
        tmp_meta = stack.enter_context(atomic_path(os.path.join(out_dir, "meta.json")))
        for name in reversed(SPLITS):
            with open(stack.enter_context(atomic_path(os.path.join(out_dir, f"{name}.npz"))), "wb") as f:
                np.savez(f, **splits[name])  # a file object: np.savez would append .npz to a path
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
    return meta


def build_parser():
    p = CLIParser(
        description="Clean, tokenize and split instruction data (databricks-dolly-15k schema: instruction, "
                    "context, response, category) into OUT_DIR/train.npz, val.npz and meta.json for "
                    "finetune_dolly.py. Loss mask: 1 on the response and its closing <|endoftext|>.",
        formatter_class=DefaultsFormatter)
    p.add_argument("--input", metavar="FILE", help="local .jsonl file, optionally .xz/.gz/.bz2 "
                   f"(default: {HF_DATASET} from the Hugging Face hub, which needs network)")
    p.add_argument("--out-dir", metavar="DIR", default="data/dolly", help="output folder")
    p.add_argument("--val-fraction", metavar="F", type=bounded(float, 0, below=1), default=DEFAULT_VAL_FRACTION,
                   help="fraction of each category held out for validation, 0 <= F < 1")
    p.add_argument("--max-len", metavar="N", type=bounded(int, 2), default=DEFAULT_MAX_LEN,
                   help="drop examples longer than N tokens, prompt + response + <|endoftext|>")
    p.add_argument("--seed", metavar="S", type=bounded(int, 0), default=1337, help="seed of the split")
    p.add_argument("--limit", metavar="N", type=bounded(int, 1), help="use only the first N input rows (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.input:
        rows = read_file_rows(args.input, args.limit)
        with open(args.input, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()  # instruction files are small
        source = {"type": "file", "name": args.input, "path": os.path.abspath(args.input), "sha256": digest}
    else:
        print(f"loading {HF_DATASET} from the Hugging Face hub (offline? pass a local copy with --input FILE.jsonl)",
              flush=True)
        records = enumerate(itertools.islice(open_hub_rows(HF_DATASET), args.limit), 1)
        rows = [validate_row(obj, f"{HF_DATASET} row {i}") for i, obj in records]
        source = {"type": "huggingface", "name": HF_DATASET, "split": "train"}
    meta = prepare(rows, args.out_dir, {**source, "limit": args.limit}, args.val_fraction, args.max_len, args.seed,
                   progress=not args.no_progress)
    print(format_summary(meta))
    print(f"wrote {', '.join(os.path.join(args.out_dir, n) for n in ('train.npz', 'val.npz', 'meta.json'))}")
    return meta


if __name__ == "__main__":
    run_cli(main)
