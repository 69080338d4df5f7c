"""Small shared helpers, torch-free (so the data tools' --help answers at once): user-facing errors, atomic
writes, compressed files, the one JSONL reader and hub loader, a serving process's heap freeze. Devices,
dtypes and torchrun: device.py."""

import bz2
import contextlib
import gc
import gzip
import itertools
import json
import lzma
import os
import re
import secrets
import zlib

from cli import UserError, run_cli  # noqa: F401  (the CLI edge, re-exported)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on success rename it over `path` (atomic on POSIX: readers see the old
    file or the whole new one, even if the process is killed), on failure delete it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a fresh name the writer creates (so it gets the usual mode, 0666 minus umask)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


STALE_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # what atomic_path's temp names look like


def clean_stale_temps(folder):
    """Remove the temp files that killed atomic_path writes left in `folder`."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if STALE_TEMP.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


MAX_LINE_BYTES = 64 << 20  # one record a line: a longer "line" is a file without newlines, not a record


def json_type(value):
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def parse_json(data, where, kind=dict):
    """JSON bytes (a JSONL line, or a .json file) -> a `kind`; any problem is a UserError `where: ...`."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise UserError(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except ValueError as e:  # a number too long to convert
        raise UserError(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(value, kind):
        raise UserError(f"{where}: expected a JSON {json_type(kind())}, got {json_type(value)}")
    return value


def iter_jsonl(path):
    """The one JSONL reader: (line number, object) for each line of a .jsonl[.xz|.gz|.bz2] file; every problem
    is a UserError `path:line: message` (docs/design.md, Instruction data, lists them)."""
    lineno = 0
    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1], open)  # by suffix
    try:
        with opener(path, "rb") as f:
            while line := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(line) > MAX_LINE_BYTES:
                    raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB "
                                    f"(one object a line?)")
                if not line.strip():
                    raise UserError(f"{path}:{lineno}: blank line (JSONL holds one JSON object on every line)")
                yield lineno, parse_json(line.rstrip(b"\r\n"), f"{path}:{lineno}")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise UserError(f"{path}:{lineno + 1}: cannot read: {type(e).__name__}: {e}".splitlines()[0]) from None


def open_hub_rows(dataset, split="train", **options):
    """The rows of datasets.load_dataset(dataset, split=split, **options), online. The first is fetched now, so
    offline fails at once; every failure, then or later, is one UserError suggesting local files (--input)."""
    def rows():
        try:
            import datasets  # online runs only
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # its retry warnings would bury the one-line error
            yield from datasets.load_dataset(dataset, split=split, **options)
        except Exception as e:  # offline, unknown dataset, a dropped connection: one line, no traceback
            raise UserError(f"could not load {dataset} from the Hugging Face hub ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); offline? pass local files with --input") from None

    stream = rows()
    first = list(itertools.islice(stream, 1))
    return itertools.chain(first, stream)


def freeze_heap():
    """In a serving process once built (serve.py, the engine's process; gunicorn's worker inlines it): what is
    alive now lives as long as the process, so it leaves the garbage collector's full passes. The thousands of
    small lists a loglikelihood reply unpickles and renders kept triggering them over the whole heap (flask,
    torch): 30% of the HTTP worker's GIL time went to the collector (py-spy --gil --native), 0-8% frozen."""
    gc.collect()
    gc.freeze()
