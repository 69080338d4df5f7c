"""
The whole pipeline on the bundled data, on a CPU, in a few minutes: `make demo` (or `python demo.py`).

    python demo.py                 # tokenize, pretrain, prepare, fine-tune, then serve the chat page
    python demo.py --port 8000     # serve on another port
    python demo.py --no-serve      # stop after fine-tuning
    python demo.py --force         # redo every stage
    python demo.py --smoke         # a few steps per stage, serve, one POST /generate, shut down

Stages (each one is the project's own script, run as a subprocess with the command printed first,
so what you see is what you would type):

  1. fineweb.py        demo_data/books.jsonl.xz (5 public-domain books, ~615k tokens) -> {data}/shards
  2. train_gpt2.py     a tiny GPT from scratch on those shards                      -> {out}/pretrain
  3. prepare_dolly.py  demo_data/instructions.jsonl.xz (1,500 instructions)          -> {data}/dolly
  4. finetune_dolly.py the pretrained model on the instructions                      -> {out}/sft
  5. serve.py          {out}/sft on http://127.0.0.1:5000 (the chat page and the API) until Ctrl+C

{data} is DATA_ROOT/demo and {out} is OUT_ROOT/demo (DATA_ROOT `data`, OUT_ROOT `out` beside this
file; `--smoke` uses demo-smoke folders, so it never touches the real demo's files).

Reuse: a finished stage leaves `.demo-stage.json` in its output folder (the command that made it,
state "done", seconds taken), written only after the script exited 0 and its output checked out
(shards readable; a checkpoint at its final step; meta.json beside the .npz files). A second run
skips such a stage ("reusing ..."). A stage whose command changed, or whose output is missing or
incomplete, runs again, and so does every stage that reads its output. An interrupted training stage
(Ctrl+C: the trainer saves a checkpoint first) continues from its checkpoint with
`--init-from resume` on the next run. `--force` redoes everything.

Ctrl+C goes to the running script once (the trainers checkpoint at the end of the step and exit; a
second Ctrl+C stops them at once); while serving, it stops the server cleanly.
Exit codes: 0 done, 1 a stage failed (the stage, its command and exit code are printed),
2 a usage mistake (e.g. the port is taken), 130 interrupted.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

from common import UserError, atomic_path, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))
BOOKS = os.path.join(ROOT, "demo_data", "books.jsonl.xz")
INSTRUCTIONS = os.path.join(ROOT, "demo_data", "instructions.jsonl.xz")
MARKER = ".demo-stage.json"
SHARD_PREFIX = "books"
PRETRAIN_RUN_FILES = ("ckpt.pt", "log.jsonl", "samples.jsonl", "loss.png")
EXAMPLE_INSTRUCTION = "Name three primary colours."


# ====================================================================== sizes of the two modes

@dataclass(frozen=True)
class Recipe:
    """Every size the demo chooses, for one mode (the full demo or the smoke run)."""

    folder: str  # demo | demo-smoke, under --data-root and --out-root
    # fineweb.py
    shard_size: int
    val_tokens: int
    max_tokens: int = None
    # train_gpt2.py (pretraining from scratch). Chosen by SFT val loss at equal CPU time (2 cores, ~4 min
    # for both trainings): the 50,304-row LM head is most of the compute, so a narrow model buys steps,
    # and at this budget more, smaller steps beat bigger batches. Val loss on the instructions: 7.29
    # (this recipe) vs 7.54 (128 wide, 120 steps of 2,048 tokens; 32-256 wide and 4-8 layers tried).
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 32
    block_size: int = 256     # the instructions' max length; longer ones are dropped
    batch_size: int = 4
    total_batch_size: int = 1024
    max_steps: int = 340
    warmup_steps: int = 10
    lr: float = 1e-2          # tiny models take a high lr: 6e-3 / 8e-3 / 1e-2 tried, 1e-2 best
    eval_interval: int = 85
    eval_steps: int = 4
    sample_tokens: int = 32
    ckpt_interval: int = 40
    log_interval: int = 5
    loss_chunk: int = 1024
    # prepare_dolly.py
    limit: int = None
    # finetune_dolly.py: the SFT steps buy more val loss per second than pretraining steps past ~150
    sft_batch_size: int = 12
    sft_examples_per_step: int = 12
    sft_max_steps: int = 80
    sft_lr: float = 8e-3      # 4e-3 / 8e-3 / 1.2e-2 within 0.03 of each other; 1.5e-3 was clearly worse
    sft_eval_interval: int = 40
    sft_eval_examples: int = None
    sft_sample_count: int = 1
    sft_sample_tokens: int = 32
    sft_pad_multiple: int = 16
    # what to tell the user
    expected: dict = field(default_factory=dict)


DEMO = Recipe(
    folder="demo", shard_size=1_000_000, val_tokens=32_768,
    expected={"pretrain": "about 2 minutes on 2 CPU cores", "sft": "about 2 minutes on 2 CPU cores"},
)

SMOKE = Recipe(
    folder="demo-smoke", shard_size=8_192, val_tokens=2_048, max_tokens=24_000,
    n_layer=2, n_head=2, n_embd=32, block_size=128, batch_size=4, total_batch_size=512, max_steps=4,
    warmup_steps=1, lr=1e-3, eval_interval=2, eval_steps=2, sample_tokens=8, ckpt_interval=2, log_interval=1,
    limit=300, sft_batch_size=4, sft_examples_per_step=4, sft_max_steps=3, sft_lr=1e-3, sft_eval_interval=3,
    sft_eval_examples=4, sft_sample_count=1, sft_sample_tokens=8, sft_pad_multiple=16,
    expected={"pretrain": "a few seconds", "sft": "a few seconds"},
)


# ====================================================================== stages

class StageFailed(Exception):
    """A stage's script failed (or its output did not check out); the message says which and how."""


class Interrupted(Exception):
    """Ctrl+C / SIGTERM while a stage ran."""


@dataclass
class Stage:
    key: str            # shards | pretrain | dolly | sft
    title: str
    out_dir: str        # absolute
    argv: list          # script and flags, paths as shown to the user (relative to ROOT when inside it)
    check: Callable     # check(stage) -> None when the output is complete, else the reason (str)
    expected: str = ""
    resume_step: Optional[Callable] = None  # resume_step(stage) -> the step an interrupted run continues from, or None
    fresh: Optional[Callable] = None        # fresh(stage): remove an earlier run's files before starting from scratch
    needs: tuple = ()              # keys of the stages whose output this one reads: if one ran, this one runs

    def resume_argv(self):
        """The same command, continuing the interrupted run (`--init-from resume`)."""
        argv = list(self.argv)
        argv[argv.index("--init-from") + 1] = "resume"
        return argv


def shown_path(path):
    """A path as printed in commands: relative to the repository root when inside it (commands run there)."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, ROOT)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def build_stages(recipe, data_dir, out_dir, device):
    """The four stages of a mode, with the exact commands (data_dir / out_dir: this mode's folders)."""
    r = recipe
    shards, pretrain = os.path.join(data_dir, "shards"), os.path.join(out_dir, "pretrain")
    dolly, sft = os.path.join(data_dir, "dolly"), os.path.join(out_dir, "sft")
    system = ["--device", device, "--no-compile"]

    tokenize = ["fineweb.py", "--input", shown_path(BOOKS), "--out-dir", shown_path(shards),
                "--prefix", SHARD_PREFIX, "--shard-size", str(r.shard_size), "--val-tokens", str(r.val_tokens),
                "--workers", "1"]
    if r.max_tokens:
        tokenize += ["--max-tokens", str(r.max_tokens)]
    train = ["train_gpt2.py", "--data-dir", shown_path(shards), "--out-dir", shown_path(pretrain),
             "--init-from", "scratch",
             "--n-layer", str(r.n_layer), "--n-head", str(r.n_head), "--n-embd", str(r.n_embd),
             "--block-size", str(r.block_size), "--batch-size", str(r.batch_size),
             "--total-batch-size", str(r.total_batch_size), "--max-steps", str(r.max_steps),
             "--warmup-steps", str(r.warmup_steps), "--lr", f"{r.lr:g}",
             "--eval-interval", str(r.eval_interval), "--eval-steps", str(r.eval_steps),
             "--sample-tokens", str(r.sample_tokens), "--sample-prompt", "Once upon a time",
             "--ckpt-interval", str(r.ckpt_interval), "--log-interval", str(r.log_interval),
             "--loss-chunk", str(r.loss_chunk), *system]
    prepare = ["prepare_dolly.py", "--input", shown_path(INSTRUCTIONS), "--out-dir", shown_path(dolly),
               "--max-len", str(r.block_size)]
    if r.limit:
        prepare += ["--limit", str(r.limit)]
    finetune = ["finetune_dolly.py", "--data-dir", shown_path(dolly), "--init-from", shown_path(pretrain),
                "--out-dir", shown_path(sft), "--overwrite",
                "--batch-size", str(r.sft_batch_size), "--examples-per-step", str(r.sft_examples_per_step),
                "--max-steps", str(r.sft_max_steps), "--lr", f"{r.sft_lr:g}",
                "--eval-interval", str(r.sft_eval_interval), "--sample-count", str(r.sft_sample_count),
                "--sample-tokens", str(r.sft_sample_tokens), "--pad-multiple", str(r.sft_pad_multiple),
                "--log-interval", str(r.log_interval), *system]
    if r.sft_eval_examples:
        finetune += ["--eval-examples", str(r.sft_eval_examples)]

    n_params = approx_params(r)
    return [
        Stage("shards", "tokenize the 5 bundled books into GPT-2 token shards", shards, tokenize, check_shards,
              expected="a few seconds"),
        Stage("pretrain", f"pretrain a tiny GPT from scratch ({r.n_layer} layers, {r.n_embd} wide, "
                          f"{n_params / 1e6:.1f}M parameters, {r.max_steps} steps of {r.total_batch_size:,} tokens)",
              pretrain, train, check_pretrain, expected=r.expected.get("pretrain", ""),
              resume_step=resumable_pretrain, fresh=remove_pretrain_files, needs=("shards",)),
        Stage("dolly", "tokenize the bundled instructions with the prompt template", dolly, prepare, check_dolly,
              expected="a few seconds"),
        Stage("sft", f"instruction-tune it ({r.sft_max_steps} steps of {r.sft_examples_per_step} examples)",
              sft, finetune, check_sft, expected=r.expected.get("sft", ""), resume_step=resumable_sft,
              needs=("pretrain", "dolly")),
    ]


def approx_params(r):
    """Parameters of the tiny GPT (tied embedding padded to 50304 rows, as train_gpt2.py builds it)."""
    per_block = 12 * r.n_embd ** 2 + 13 * r.n_embd
    return 50304 * r.n_embd + r.block_size * r.n_embd + r.n_layer * per_block + 2 * r.n_embd


# ---------------------------------------------------------------------- output checks

def _checkpoint_step(path):
    """(step, max_steps) of a checkpoint, or None when it is missing or unreadable."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, not a checkpoint: not finished, whatever the reason
        return None
    args = ckpt.get("args") or {}
    return int(ckpt.get("step", -1)), args.get("max_steps")


def check_shards(stage):
    from fineweb import list_shards, read_shard

    try:
        paths = list_shards(stage.out_dir, "val", SHARD_PREFIX) + list_shards(stage.out_dir, "train", SHARD_PREFIX)
        for path in paths:
            read_shard(path)
    except UserError as e:
        return str(e)
    return None


def check_pretrain(stage):
    found = _checkpoint_step(os.path.join(stage.out_dir, "ckpt.pt"))
    if found is None:
        return "no readable ckpt.pt"
    step, max_steps = found
    if max_steps is None or step < max_steps:
        return f"ckpt.pt is at step {step} of {max_steps}"
    return None


def check_dolly(stage):
    for name in ("meta.json", "train.npz", "val.npz"):
        if not os.path.isfile(os.path.join(stage.out_dir, name)):
            return f"{name} is missing"
    return None


def check_sft(stage):
    if not os.path.isfile(os.path.join(stage.out_dir, "ckpt.pt")):
        return "no ckpt.pt"
    found = _checkpoint_step(os.path.join(stage.out_dir, "last.pt"))
    if found is None:
        return "no readable last.pt"
    step, max_steps = found
    if max_steps is None or step < max_steps:
        return f"last.pt is at step {step} of {max_steps}"
    return None


def resumable_pretrain(stage):
    found = _checkpoint_step(os.path.join(stage.out_dir, "ckpt.pt"))
    return found[0] if found and found[1] and 0 < found[0] < found[1] else None


def resumable_sft(stage):
    found = _checkpoint_step(os.path.join(stage.out_dir, "last.pt"))
    return found[0] if found and found[1] and 0 < found[0] < found[1] else None


def remove_pretrain_files(stage):
    """A from-scratch run must not append to an earlier run's log.jsonl (train_gpt2.py appends)."""
    for name in PRETRAIN_RUN_FILES:
        path = os.path.join(stage.out_dir, name)
        if os.path.exists(path):
            os.remove(path)


# ---------------------------------------------------------------------- markers

def read_marker(stage):
    try:
        with open(os.path.join(stage.out_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(stage, state, **extra):
    try:
        os.makedirs(stage.out_dir, exist_ok=True)
        with atomic_path(os.path.join(stage.out_dir, MARKER)) as tmp:
            with open(tmp, "w") as f:
                json.dump({"stage": stage.key, "state": state, "argv": stage.argv, **extra}, f, indent=1)
    except OSError as e:
        raise UserError(f"cannot write in {stage.out_dir}: {e.strerror or e} (check --data-root / --out-root)") from None


def stage_status(stage):
    """("done", marker) | ("interrupted", step) | ("new", reason) for this stage's command."""
    marker = read_marker(stage)
    if marker is None:
        return "new", "not run yet"
    if marker.get("argv") != stage.argv:
        return "new", "its settings changed"
    if marker.get("state") == "done":
        problem = stage.check(stage)
        return ("done", marker) if problem is None else ("new", f"its output is incomplete ({problem})")
    if stage.resume_step is not None:
        step = stage.resume_step(stage)
        if step is not None:
            return "interrupted", step
    return "new", "an earlier run did not finish"


# ====================================================================== running scripts

class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, handled like Ctrl+C."""


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def python_shown():
    """How the interpreter is written in printed commands: `python` when that is this interpreter."""
    found = shutil.which("python")
    if found and os.path.realpath(found) == os.path.realpath(sys.executable) and \
            os.path.dirname(os.path.abspath(found)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "python"
    return shown_path(sys.executable)


def child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def start_script(argv):
    """Start `python SCRIPT ...` in the repository root, in its own process group: signals reach it only
    through forward_signal (once per Ctrl+C; a terminal's Ctrl+C would otherwise reach it twice)."""
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=child_env(), start_new_session=True)


def forward_signal(proc, exc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)


def wait_script(proc, grace_kill_after=3):
    """Wait for a script; Ctrl+C is forwarded to it. Returns (exit code, interrupted)."""
    interrupts = 0
    while True:
        try:
            return proc.wait(), interrupts > 0
        except KeyboardInterrupt as e:
            interrupts += 1
            if interrupts >= grace_kill_after and proc.poll() is None:
                proc.kill()
            else:
                forward_signal(proc, e)


def say(msg=""):
    print(msg, flush=True)


def run_stage(index, total, stage, force, upstream_ran):
    """Run one stage unless a finished one can be reused; returns (ran, seconds)."""
    head = f"[{index}/{total}] {stage.title}"
    status, detail = ("new", "--force") if force else stage_status(stage)
    if status == "done" and not upstream_ran:
        took = detail.get("seconds")
        say(f"\n{head}\n      reusing {shown_path(stage.out_dir)} (finished earlier"
            + (f" in {took:.0f} s" if isinstance(took, (int, float)) else "") + "; --force redoes it)")
        return False, 0.0
    argv = stage.argv
    if status == "interrupted" and not upstream_ran:
        argv = stage.resume_argv()
        note = f"continuing the interrupted run from step {detail}"
    else:
        note = detail if status == "new" else "a stage it builds on ran again"
        if stage.fresh is not None:
            stage.fresh(stage)
    say(f"\n{head}" + (f": {stage.expected}" if stage.expected else ""))
    say(f"      ({note})")
    say("$ " + shlex.join([python_shown(), *argv]))
    write_marker(stage, "running")
    t0 = time.time()
    code, interrupted = wait_script(start_script(argv))
    seconds = time.time() - t0
    if interrupted:
        raise Interrupted(f"stage {index}/{total} ({stage.key}) interrupted after {seconds:.0f} s; "
                          f"run the demo again to continue")
    if code != 0:
        raise StageFailed(f"stage {index}/{total} ({stage.key}) failed with exit code {code}\n"
                          f"  command: {shlex.join([python_shown(), *argv])}\n"
                          f"  (run in {ROOT}; its own error message is above)\n"
                          f"  finished stages are kept: fix the problem and run the demo again")
    problem = stage.check(stage)
    if problem is not None:
        raise StageFailed(f"stage {index}/{total} ({stage.key}) exited 0 but its output is incomplete: {problem}\n"
                          f"  command: {shlex.join([python_shown(), *argv])}")
    write_marker(stage, "done", seconds=round(seconds, 1), finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    say(f"[{index}/{total}] done in {seconds:.0f} s" + loss_summary(stage))
    return True, seconds


def loss_summary(stage):
    """': train loss A -> B, val loss C -> D' from a training stage's log.jsonl, or ''."""
    losses = read_losses(stage.out_dir)
    if not losses:
        return ""
    parts = []
    if "first_train" in losses and "last_train" in losses:
        parts.append(f"train loss {losses['first_train']:.2f} -> {losses['last_train']:.2f}")
    if "first_val" in losses and "last_val" in losses:
        parts.append(f"val loss {losses['first_val']:.2f} -> {losses['last_val']:.2f}")
    return (": " + ", ".join(parts)) if parts else ""


def read_losses(out_dir):
    """First and last train / val losses logged in {out_dir}/log.jsonl."""
    out = {}
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return out
    for key, name in (("train_loss", "train"), ("val_loss", "val")):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out["first_" + name], out["last_" + name] = values[0], values[-1]
    return out


# ====================================================================== serving

def check_port_free(host, port):
    """A UserError when host:port cannot be bound (another server there), before minutes of training."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e}): stop what uses it, or pass "
                            f"--port N (or --no-serve)") from None


def url_of(host, port, path="/"):
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def http_json(url, body=None, timeout=10.0):
    """(status, parsed JSON or None) of a GET (body None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def wait_until_ready(proc, host, port, timeout):
    """Poll GET /health until 200; StageFailed if the server exits, reports a load error or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StageFailed(f"serve.py exited with code {proc.returncode} before it was ready (its error is above)")
        try:
            status, body = http_json(url_of(host, port, "/health"), timeout=2.0)
        except OSError:
            status, body = None, None
        if status == 200:
            return body
        if isinstance(body, dict) and body.get("status") == "error":
            raise StageFailed(f"serve.py could not load the model: {body.get('error')}")
        time.sleep(0.5)
    raise StageFailed(f"serve.py was not ready after {timeout:.0f} s ({url_of(host, port, '/health')})")


def stop_server(proc, timeout=20.0):
    """SIGINT (serve.py stops cleanly: engine closed), then SIGKILL if it hangs. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def curl_example(host, port):
    body = json.dumps({"prompt": EXAMPLE_INSTRUCTION, "max_new_tokens": 64})
    return f"curl -s {url_of(host, port, '/generate')} -H 'Content-Type: application/json' -d '{body}'"


def serve(argv, host, port, smoke, ready_timeout=180.0):
    """Start serve.py, print the URL and a curl example; smoke: one POST /generate, then stop."""
    say("\n[serve] start the server (the chat page and the HTTP API)")
    say("$ " + shlex.join([python_shown(), *argv]))
    proc = start_script(argv)
    try:
        info = wait_until_ready(proc, host, port, ready_timeout)
        if smoke:
            return smoke_request(proc, host, port, info)
        bar = "=" * 72
        say(f"\n{bar}\n  The chat page is ready: {url_of(host, port)}\n"
            f"  (model {info.get('model')} on {info.get('device')})\n\n"
            f"  Or ask the API from another terminal:\n    {curl_example(host, port)}\n\n"
            f"  Press Ctrl+C to stop the server.\n{bar}\n")
        code, interrupted = wait_script(proc)
        if interrupted:
            say("\nserver stopped.")
            return 0
        raise StageFailed(f"serve.py exited with code {code}")
    except KeyboardInterrupt as e:  # Ctrl+C while waiting for it to load
        forward_signal(proc, e)
        stop_server(proc)
        say("\nserver stopped.")
        return 0
    finally:
        if proc.poll() is None:
            stop_server(proc)


def smoke_request(proc, host, port, info):
    """One real POST /generate; prints the reply; stops the server. StageFailed if no text came back."""
    body = {"prompt": EXAMPLE_INSTRUCTION, "max_new_tokens": 16, "temperature": 0.8, "seed": 0}
    say(f"\n[smoke] server ready ({info.get('model')} on {info.get('device')}); "
        f"POST {url_of(host, port, '/generate')} {json.dumps(body)}")
    status, reply = http_json(url_of(host, port, "/generate"), body, timeout=120.0)
    if status != 200 or not isinstance(reply, dict) or not isinstance(reply.get("text"), str):
        raise StageFailed(f"POST /generate answered {status}: {reply}")
    say(f"[smoke] reply: {json.dumps(reply, ensure_ascii=False)}")
    if not reply["text"]:
        raise StageFailed("POST /generate returned an empty text")
    code = stop_server(proc)
    say(f"[smoke] server stopped (exit code {code}); smoke run passed")
    return 0


# ====================================================================== CLI

def build_parser():
    p = argparse.ArgumentParser(
        description="The whole pipeline on the bundled data, on CPU: tokenize 5 public-domain books, pretrain a "
                    "tiny GPT (about 2-3 minutes on 2 cores), instruction-tune it on 1,500 bundled instructions, "
                    "then serve the chat page. A second run reuses finished stages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python demo.py                # everything, then http://127.0.0.1:5000\n"
               "  python demo.py --port 8000    # another port\n"
               "  python demo.py --smoke        # a few steps per stage, one /generate request, exit\n"
               "  python demo.py --force        # redo every stage",
    )
    p.add_argument("--smoke", action="store_true",
                   help="a few steps per stage with a tiny model, in separate demo-smoke folders; then serve, send "
                        "one POST /generate, print the reply and shut down")
    p.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    p.add_argument("--no-serve", action="store_true", help="stop after fine-tuning (print how to serve)")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds (default: %(default)s)")
    p.add_argument("--port", type=int, default=5000, help="port the server binds (default: %(default)s)")
    p.add_argument("--data-root", default=os.path.join(ROOT, "data"),
                   help="data goes to DATA_ROOT/demo (or demo-smoke) (default: data beside demo.py)")
    p.add_argument("--out-root", default=os.path.join(ROOT, "out"),
                   help="checkpoints go to OUT_ROOT/demo (or demo-smoke) (default: out beside demo.py)")
    p.add_argument("--device", default="cpu",
                   help="device for training and serving: cpu (what the sizes are chosen for), auto, cuda, mps "
                        "(default: %(default)s)")
    return p


def check_inputs(args):
    for path in (BOOKS, INSTRUCTIONS):
        if not os.path.isfile(path):
            raise UserError(f"bundled data not found: {path} (it comes with the repository; see demo_data/README.md)")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_inputs(args)
    recipe = SMOKE if args.smoke else DEMO
    data_dir = os.path.join(os.path.abspath(args.data_root), recipe.folder)
    out_dir = os.path.join(os.path.abspath(args.out_root), recipe.folder)
    serving = not args.no_serve
    if serving:
        check_port_free(args.host, args.port)
    stages = build_stages(recipe, data_dir, out_dir, args.device)
    serve_argv = ["serve.py", "--ckpt", shown_path(stages[-1].out_dir), "--host", args.host,
                  "--port", str(args.port), "--device", args.device]

    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl+C raises KeyboardInterrupt here even when started with SIGINT ignored (`cmd &` in a script); the
    # scripts then start with the default action too, so the one SIGINT forwarded to them is not lost.
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run(args, recipe, stages, serve_argv, data_dir, out_dir)
    except StageFailed as e:
        print(f"\ndemo: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:
        print(f"\ndemo: {e}", file=sys.stderr, flush=True)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(args, recipe, stages, serve_argv, data_dir, out_dir):
    say(f"gpt2-instruct demo{' (smoke run)' if args.smoke else ''}: pretrain a tiny GPT on 5 public-domain books, "
        f"instruction-tune it, serve it.\n  data in {shown_path(data_dir)}, checkpoints in {shown_path(out_dir)}; "
        f"finished stages are reused (--force redoes them); Ctrl+C stops.")
    t0 = time.time()
    ran, timings = set(), {}
    for i, stage in enumerate(stages, 1):
        did_run, seconds = run_stage(i, len(stages), stage, args.force, upstream_ran=bool(ran & set(stage.needs)))
        if did_run:
            ran.add(stage.key)
        timings[stage.key] = f"{seconds:.0f} s" if did_run else "reused"
    summary = ", ".join(f"{k} {v}" for k, v in timings.items())
    say(f"\nall stages finished in {time.time() - t0:.0f} s ({summary})." if ran else
        "\nevery stage was finished earlier: nothing to redo.")
    say(f"  model: {shown_path(stages[-1].out_dir)}/ckpt.pt")
    say("  try it from the shell: " + shlex.join([python_shown(), "inference.py", "--ckpt",
                                                 shown_path(stages[-1].out_dir), "--prompt", EXAMPLE_INSTRUCTION]))
    if args.no_serve:
        say("  serve it:              " + shlex.join([python_shown(), *serve_argv]))
        return 0
    check_port_free(args.host, args.port)
    return serve(serve_argv, args.host, args.port, args.smoke)


if __name__ == "__main__":
    sys.exit(run_cli(main))
