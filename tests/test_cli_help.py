"""Every script answers --help (exit 0), and every command line in README.md uses only flags that exist.

The README check reads fenced shell code blocks (bash, sh, shell, console, zsh, or no language):
joins backslash line continuations, drops comments and `$ ` prompts, replaces `$(...)` / backticks
with a placeholder, splits on `&&`, `||`, `;` and `|`, skips `VAR=value` prefixes, and finds the
script a launcher runs (`python X.py`, `.venv/bin/python -u X.py`, `torchrun ... X.py`, `./X.py`).
Every `--flag` after the script must appear in that script's --help. gunicorn lines: the config
file exists, the app is serve's create_app, and gunicorn's own flags exist in `gunicorn --help`.
Everywhere: each `GPT2I_*` variable is one serve.py's --help or gunicorn.conf.py documents, and
each `make TARGET` is a Makefile target (and the flags in `DEMO_ARGS="..."` exist in demo.py's --help).
"""

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("fineweb.py", "train_gpt2.py", "prepare_dolly.py", "finetune_dolly.py", "inference.py", "serve.py",
           "demo.py", "hellaswag.py", "bench/lora_memory.py", "bench/train_throughput.py", "bench/generate.py")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh", "shell-session", "shellsession"}
FLAG_RE = re.compile(r"(?<![\w-])--[A-Za-z0-9][A-Za-z0-9_-]*")
ENV_RE = re.compile(r"\bGPT2I_[A-Z0-9_]+\b")
ASSIGN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON_RE = re.compile(r"^python(\d+(\.\d+)*)?$")
SEPARATORS = {"&&", "||", ";", "|", "&"}


# ====================================================================== README parsing

def code_blocks(markdown):
    """(language, text) of each fenced code block (``` or ~~~, any indentation)."""
    blocks, lang, fence, lines = [], None, None, []
    for line in markdown.splitlines():
        stripped = line.strip()
        if fence is None:
            m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, lang, lines = m.group(1), m.group(2).lower(), []
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append((lang, "\n".join(lines)))
            fence = None
        else:
            lines.append(line)
    return blocks


def _strip_substitutions(text):
    """Replace $(...) (nested, quotes inside) and `...` with the word SUBST: their flags are not ours."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i) and not text.startswith("$((", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            out.append("SUBST")
            i = j
        elif text[i] == "`":
            j = text.find("`", i + 1)
            out.append("SUBST")
            i = len(text) if j < 0 else j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def shell_lines(block):
    """Logical command lines of a shell block: continuations joined, prompts and output lines dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not current:
            stripped = line.lstrip()
            if stripped.startswith(("$ ", "> ", "# $ ")):  # console prompt (and '>' continuation prompts)
                line = stripped[2:]
            elif stripped.startswith("(.venv) $ "):
                line = stripped[len("(.venv) $ "):]
        if current:
            line = line.lstrip()
        if line.endswith("\\") and not line.endswith("\\\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def simple_commands(line):
    """Token lists of the simple commands in one line (comments, substitutions and operators handled)."""
    lexer = shlex.shlex(_strip_substitutions(line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command we can check (prose in a code block)
        return []
    commands, current = [], []
    for tok in tokens:
        if tok in SEPARATORS or set(tok) <= set(";&|"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        commands.append(current)
    return commands


def _is_launcher(tok):
    base = os.path.basename(tok)
    return bool(PYTHON_RE.match(base)) or base in ("torchrun", "accelerate", "uv", "coverage")


def script_invocation(tokens):
    """(script, args after it) when the command runs one of SCRIPTS (`./X.py ...`, or a launcher such as
    python / torchrun anywhere before it: `env`, `uv run`, `docker run IMAGE python X.py` too), else None."""
    words = [t for t in tokens if not ASSIGN_RE.match(t)]  # VAR=value prefixes (and docker's -e values)
    if words and _script_name(words[0]):
        return _script_name(words[0]), words[1:]
    for i, tok in enumerate(words):
        if _is_launcher(tok):
            for j in range(i + 1, len(words)):
                name = _script_name(words[j])
                if name:
                    return name, words[j + 1:]
            return None
    return None


def _script_name(tok):
    """The SCRIPTS entry a token names (X.py, ./X.py, /path/to/repo/bench/X.py), or None."""
    norm = tok[2:] if tok.startswith("./") else tok
    for script in SCRIPTS:
        if norm == script or norm.endswith("/" + script):
            return script
    return None


def flags_in(args):
    """--flags among a script's arguments (`--flag=value` counts as --flag; values are not flags)."""
    flags = []
    for tok in args:
        if tok == "--":
            break
        if tok.startswith("--") and len(tok) > 2:
            flags.append(tok.split("=", 1)[0])
    return flags


def inline_code(markdown):
    """Inline code spans (`...`) outside fenced blocks."""
    outside, fence = [], None
    for line in markdown.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
        else:
            outside.append(line)
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", "\n".join(outside))


def readme_commands(markdown):
    """[(line, tokens)] of every simple command in the shell code blocks of a Markdown text, plus the
    inline code spans that run one of SCRIPTS (`python demo.py --force` in a sentence)."""
    found = []
    for lang, block in code_blocks(markdown):
        if lang not in SHELL_LANGS:
            continue
        for line in shell_lines(block):
            for tokens in simple_commands(line):
                found.append((line, tokens))
    for span in inline_code(markdown):
        for tokens in simple_commands(span):
            if script_invocation(tokens) is not None:
                found.append((span, tokens))
    return found


def flag_problems(markdown, help_of, gunicorn_help="", env_names=(), make_targets=None):
    """Every mismatch between the Markdown's commands and the scripts' --help, as readable lines."""
    problems = []
    for line, tokens in readme_commands(markdown):
        for name in ENV_RE.findall(" ".join(tokens)):
            if env_names and name not in env_names:
                problems.append(f"{name} is not a documented variable: {line}")
        inv = script_invocation(tokens)
        if inv is not None:
            script, args = inv
            known = set(FLAG_RE.findall(help_of[script]))
            problems += [f"{script} has no {flag}: {line}" for flag in flags_in(args) if flag not in known]
            continue
        words = [t for t in tokens if not ASSIGN_RE.match(t)]
        if words and os.path.basename(words[0]) == "gunicorn":
            problems += _gunicorn_problems(line, words, gunicorn_help)
        elif words and words[0] == "make":
            if make_targets is not None:
                problems += [f"no Makefile target {t!r}: {line}" for t in words[1:]
                             if not t.startswith("-") and "=" not in t and t not in make_targets]
            demo_args = [t.split("=", 1)[1] for t in tokens if t.startswith("DEMO_ARGS=")]
            known = set(FLAG_RE.findall(help_of["demo.py"]))
            problems += [f"demo.py has no {flag}: {line}" for value in demo_args
                         for flag in flags_in(shlex.split(value)) if flag not in known]
    return problems


def _gunicorn_problems(line, words, gunicorn_help):
    problems = []
    if gunicorn_help:
        known = set(FLAG_RE.findall(gunicorn_help))
        problems += [f"gunicorn has no {f}: {line}" for f in flags_in(words[1:]) if f not in known]
    for i, tok in enumerate(words[:-1]):
        if tok in ("-c", "--config") and not os.path.isfile(os.path.join(ROOT, words[i + 1].removeprefix("python:"))):
            problems.append(f"gunicorn config {words[i + 1]} not found: {line}")
    apps = [t for t in words[1:] if ":" in t and not t.startswith("-")]
    if not any(t.startswith("serve:create_app") for t in apps):
        problems.append(f"gunicorn line does not serve serve:create_app(): {line}")
    return problems


def makefile_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", f.read(), re.M)}


def documented_env_names(serve_help):
    with open(os.path.join(ROOT, "gunicorn.conf.py")) as f:
        return set(ENV_RE.findall(serve_help)) | set(ENV_RE.findall(f.read()))


# ====================================================================== --help of every script

def run_help(script):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def helps():
    """{script: completed process of `python script --help`}, run two at a time."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SCRIPTS, pool.map(run_help, SCRIPTS)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(helps, script):
    proc = helps[script]
    assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert "usage:" in proc.stdout and "--help" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_readme_flags_exist(helps):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    help_of = {s: p.stdout for s, p in helps.items()}
    gunicorn = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    problems = flag_problems(readme, help_of, gunicorn, documented_env_names(help_of["serve.py"]),
                             makefile_targets())
    assert not problems, "README.md commands that would not work:\n" + "\n".join(problems)


# ====================================================================== the parser itself

SAMPLE = r"""
Intro text with `python serve.py --port 8000` inline, and `--flag` or `make x` spans that are no command.

```bash
make setup && make demo        # two commands
make demo DEMO_ARGS="--port 8000 --smok"
python fineweb.py --input demo_data/books.jsonl.xz \
    --out-dir data/books --shard-size 10000000   # a comment --bogus
OMP_NUM_THREADS=8 torchrun --standalone --nproc_per_node=8 train_gpt2.py \
  --data-dir data/fineweb --compile --max-steps=19073
python finetune_dolly.py --init-from $(ls -d out/pretrain | head -n1 --zero) --data-dir data/dolly
GPT2I_CKPT=out/dolly/ckpt.pt GPT2I_WORKERS=2 gunicorn -c gunicorn.conf.py --bind 0.0.0.0:8000 "serve:create_app()"
$ .venv/bin/python -u inference.py --ckpt out/dolly --prompt "Say #1 --thing" --stream
curl -s localhost:5000/generate -d '{"prompt": "--x"}' | python -m json.tool --sort-keys
```

```python
client.completions.create(model="x")  # python blocks are not shell: --ignored
```
"""


def test_parser_reads_continuations_prefixes_substitutions_comments():
    cmds = readme_commands(SAMPLE)
    runs = [script_invocation(t) for _, t in cmds]
    runs = [(s, flags_in(a)) for s, a in (r for r in runs if r)]
    assert runs == [
        ("fineweb.py", ["--input", "--out-dir", "--shard-size"]),
        ("train_gpt2.py", ["--data-dir", "--compile", "--max-steps"]),
        ("finetune_dolly.py", ["--init-from", "--data-dir"]),
        ("inference.py", ["--ckpt", "--prompt", "--stream"]),
        ("serve.py", ["--port"]),
    ]
    assert ["make", "setup"] in [t for _, t in cmds] and ["make", "demo"] in [t for _, t in cmds]


def test_parser_reports_unknown_flags_targets_and_variables():
    help_of = {s: "" for s in SCRIPTS}
    help_of.update({
        "fineweb.py": "usage: fineweb.py [--input FILE] [--out-dir OUT_DIR] [--shard-size N]",
        "train_gpt2.py": "--data-dir DIR  --compile, --no-compile",  # no --max-steps
        "finetune_dolly.py": "--init-from X --data-dir D",
        "inference.py": "--ckpt C --prompt P --stream",
        "serve.py": "--host HOST --port PORT",
        "demo.py": "--port PORT --smoke",
    })
    problems = flag_problems(SAMPLE, help_of, gunicorn_help="-c CONFIG, --config CONFIG  -b ADDRESS, --bind ADDRESS",
                             env_names={"GPT2I_CKPT"}, make_targets={"setup"})
    assert sorted(problems) == sorted([
        "train_gpt2.py has no --max-steps: OMP_NUM_THREADS=8 torchrun --standalone --nproc_per_node=8 "
        "train_gpt2.py --data-dir data/fineweb --compile --max-steps=19073",
        "GPT2I_WORKERS is not a documented variable: GPT2I_CKPT=out/dolly/ckpt.pt GPT2I_WORKERS=2 gunicorn "
        "-c gunicorn.conf.py --bind 0.0.0.0:8000 \"serve:create_app()\"",
        "no Makefile target 'demo': make setup && make demo        # two commands",
        "no Makefile target 'demo': make demo DEMO_ARGS=\"--port 8000 --smok\"",
        "demo.py has no --smok: make demo DEMO_ARGS=\"--port 8000 --smok\"",
    ])


def test_gunicorn_line_must_name_the_app_and_an_existing_config():
    md = "```\ngunicorn -c nowhere.conf.py app:wrong\n```\n"
    problems = flag_problems(md, {s: "" for s in SCRIPTS})
    assert any("nowhere.conf.py not found" in p for p in problems)
    assert any("serve:create_app" in p for p in problems)
