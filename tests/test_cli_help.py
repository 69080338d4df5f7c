"""README.md and the command lines stay in step: every script (the README's and every other with a main())
answers --help, and every flag, make target and GPT2I_* variable the README names exists."""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
OPERATORS = {"&&", "||", "|", ";", "&"}


def readme_commands():
    """Simple commands (lists of words) in README's shell blocks and inline code spans."""
    spans = re.findall(r"^```(?:bash|sh)\n(.*?)^```", README, re.S | re.M) + re.findall(r"`([^`\n]+)`", README)
    commands = []
    for line in "\n".join(spans).replace("\\\n", " ").splitlines():
        command = []
        for word in shlex.split(line, comments=True) + [";"]:
            if word in OPERATORS:
                commands.append(command) if command else None
                command = []
            elif command or not re.match(r"^[A-Z_][A-Z0-9_]*=", word):  # skip VAR=value prefixes
                command.append(word)
    return commands


def script_flags():
    """{script: flags README passes it}; flags named alone (`--port`) go under "" (some script must have them)."""
    found = {"": set()}
    for words in readme_commands():
        if words[0].startswith("--"):
            found[""].add(words[0].split("=")[0])
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if os.path.basename(words[0]) in ("python", "python3", "torchrun") and scripts:
            i = scripts[0]
            found.setdefault(words[i], set()).update(w.split("=")[0] for w in words[i + 1:] if w.startswith("--"))
    # the Configuration table: serve.py's flags
    found["serve.py"].update(re.findall(r"^\| `(--[a-z0-9-]+)", README, re.M))
    return found


SCRIPTS = script_flags()
for _path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")):
    if "def main(" in open(_path, encoding="utf-8").read():
        SCRIPTS.setdefault(os.path.relpath(_path, ROOT), set())


@functools.cache  # each script's --help runs once: three tests read it
def help_text(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} --help exited {out.returncode}: {out.stderr[-500:]}"
    return out.stdout


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - {""}))
def test_readme_script_has_help_and_flags(script):
    assert os.path.isfile(os.path.join(ROOT, script)), f"README runs {script}, which does not exist"
    text = help_text(script)
    missing = sorted(f for f in SCRIPTS[script] if not re.search(rf"{re.escape(f)}(?![\w-])", text))
    assert not missing, f"README passes {script} flags its --help does not know: {missing}"


def test_readme_flags_named_alone_exist():
    helps = "\n".join(help_text(script) for script in set(SCRIPTS) - {""} if os.path.isfile(os.path.join(ROOT, script)))
    missing = sorted(f for f in SCRIPTS[""] if not re.search(rf"{re.escape(f)}(?![\w-])", helps))
    assert not missing, f"README names flags no script's --help knows: {missing}"


def test_readme_make_targets_and_variables_exist():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {w for words in readme_commands() if words[0] == "make" for w in words[1:] if "=" not in w}
    assert named and named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"
    documented = help_text("serve.py") + open(os.path.join(ROOT, "gunicorn.conf.py")).read()
    variables = set(re.findall(r"\bGPT2I_[A-Z0-9_]+", README))
    assert variables and not {v for v in variables if v not in documented}, \
        f"README names variables serve.py and gunicorn.conf.py do not document: {sorted(v for v in variables if v not in documented)}"
