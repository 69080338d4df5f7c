"""`make demo` (README "Quick start"). Each stage is the script's own main(argv), its command printed first; a
finished stage leaves .demo-stage.json (its command) and is reused; one whose command changed, or that reads a
stage that ran again, starts afresh. Exit codes: 0 done, 1 a stage failed, 2 a usage mistake, 130 interrupted."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from cli import CLIParser, DefaultsFormatter, bounded, help_requested

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_parser():
    p = CLIParser(
        description="The whole pipeline on the bundled data, on CPU: tokenize 5 public-domain books, pretrain a "
                    "tiny GPT, instruction-tune it on 1,500 bundled instructions, then serve the chat page. "
                    "A second run reuses finished stages.", formatter_class=DefaultsFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage with a tiny model (demo-smoke "
                   "folders), then serve, send one POST /generate, print the reply and shut down")
    p.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    p.add_argument("--no-serve", action="store_true", help="stop after fine-tuning (print how to serve)")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds")
    p.add_argument("--port", type=bounded(int, 1, below=65536), default=5000, help="port the server binds")
    p.add_argument("--data-root", default=os.path.join(ROOT, "data"), help="data goes to DATA_ROOT/demo "
                   "(or demo-smoke) (default: data beside demo.py)")
    p.add_argument("--out-root", default=os.path.join(ROOT, "out"), help="checkpoints go to OUT_ROOT/demo "
                   "(or demo-smoke) (default: out beside demo.py)")
    p.add_argument("--device", default="cpu", help="cpu (what the sizes are chosen for), auto, cuda, mps")
    return p


if __name__ == "__main__" and help_requested():
    build_parser().parse_args()  # --help answers here, before the training scripts (and torch) load

import finetune_dolly  # noqa: E402
import fineweb  # noqa: E402
import prepare_dolly  # noqa: E402
import train_gpt2  # noqa: E402
from common import UserError, atomic_path, run_cli  # noqa: E402

# ---------------------------------------------------------------- the demo model: shape, steps, learning rates
# Only this block is tuned, for the lowest instruction val loss in little CPU time (BENCHMARKS.md "The demo
# recipe"): 7.13 with Muon and 240 pretraining steps, against 7.29 for AdamW and 340 steps, which took 1.2x as
# long (432 s against 524 s on one core each, side by side). The 50,304-row LM head is most of the compute at
# any width, so a narrow model buys steps, and more, smaller steps beat a wider model or bigger batches.
PRETRAIN = {"n_layer": 4, "n_head": 4, "n_embd": 32, "block_size": 256, "batch_size": 4, "total_batch_size": 1024,
            "max_steps": 240, "warmup_steps": 10, "lr": 1e-2,  # AdamW's (embeddings): 6e-3..1e-2 suit tiny models
            "optimizer": "muon", "muon_lr": 0.04}  # the blocks' matrices; one value tried at this size
FINETUNE = {"batch_size": 12, "examples_per_step": 12, "max_steps": 80, "lr": 8e-3}  # 4e-3..1.2e-2 within 0.03
# ----------------------------------------------------------------

SMOKE_PRETRAIN = {**PRETRAIN, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 128, "batch_size": 4,
                  "total_batch_size": 512, "max_steps": 4, "warmup_steps": 1, "lr": 1e-3}
SMOKE_FINETUNE = {**FINETUNE, "batch_size": 4, "examples_per_step": 4, "max_steps": 3, "lr": 1e-3}
BOOKS = os.path.join(ROOT, "demo_data", "books.jsonl.xz")
INSTRUCTIONS = os.path.join(ROOT, "demo_data", "instructions.jsonl.xz")
MARKER = ".demo-stage.json"
MODEL_NAME = "gpt2-instruct-demo"
EXAMPLE = "Name three primary colours."


def flags(options):
    """{"max_steps": 4, "lr": 1e-3, "no_compile": True} -> ["--max-steps", "4", "--lr", "0.001", "--no-compile"]."""
    out = []
    for key, value in options.items():
        out.append("--" + key.replace("_", "-"))
        if value is not True:  # True: a bare switch
            out.append(f"{value:g}" if isinstance(value, float) else str(value))
    return out


def shown(path):
    """A path as written in commands: relative to the repository root (where they run) when inside it."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


class Stage:
    def __init__(self, key, title, main, script, out_dir, options, ckpt=None, needs=()):
        self.key, self.title, self.main, self.script, self.out_dir = key, title, main, script, out_dir
        self.argv, self.needs = flags(options), needs  # needs: the stages whose output this one reads
        self.ckpt = ckpt  # the checkpoint an interrupted run leaves (it continues with --init-from resume)

    def write_marker(self, state):
        with atomic_path(os.path.join(self.out_dir, MARKER)) as tmp, open(tmp, "w") as f:
            json.dump({"argv": self.argv, "state": state}, f)

    def status(self):
        """'done' | 'interrupted' | 'new' for this stage's command."""
        try:
            with open(os.path.join(self.out_dir, MARKER)) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return "new"
        if marker == {"argv": self.argv, "state": "done"}:
            return "done"
        resumable = self.ckpt and os.path.isfile(os.path.join(self.out_dir, self.ckpt))
        return "interrupted" if resumable and marker == {"argv": self.argv, "state": "running"} else "new"


def build_stages(smoke, data_dir, out_dir, device):
    """The four stages of a mode, with their exact commands (data_dir / out_dir: this mode's folders)."""
    shards, pretrain = os.path.join(data_dir, "shards"), os.path.join(out_dir, "pretrain")
    dolly, sft = os.path.join(data_dir, "dolly"), os.path.join(out_dir, "sft")
    if smoke:  # a few steps of a tiny model on a slice of the data: every stage, in about a minute
        tokenize = {"shard_size": 8192, "val_tokens": 2048, "max_tokens": 24_000}
        train = {**SMOKE_PRETRAIN, "eval_interval": 2, "eval_steps": 2, "sample_tokens": 8, "ckpt_interval": 2,
                 "log_interval": 1}
        prepare = {"limit": 300}
        finetune = {**SMOKE_FINETUNE, "eval_interval": 3, "eval_examples": 4, "sample_tokens": 8, "log_interval": 1}
    else:
        tokenize = {"shard_size": 1_000_000, "val_tokens": 32_768}  # val: what --eval-steps reads, and more
        train = {**PRETRAIN, "eval_interval": 40, "eval_steps": 4, "sample_tokens": 32, "ckpt_interval": 20,
                 "log_interval": 5}
        prepare = {}
        finetune = {**FINETUNE, "eval_interval": 25, "sample_tokens": 32, "log_interval": 5}
    system = {"device": device, "no_compile": True}  # compiling would take longer than these runs
    return [
        Stage("shards", "tokenize the 5 bundled books into GPT-2 token shards", fineweb.main, "fineweb.py", shards,
              {"input": shown(BOOKS), "out_dir": shown(shards), "prefix": "books", "workers": 1, **tokenize}),
        Stage("pretrain", f"pretrain a tiny GPT from scratch ({train['n_layer']} layers, {train['n_embd']} wide, "
                          f"{train['max_steps']} steps of {train['total_batch_size']:,} tokens)",
              train_gpt2.main, "train_gpt2.py", pretrain,
              {"data_dir": shown(shards), "out_dir": shown(pretrain), "init_from": "scratch", **train, **system},
              ckpt="ckpt.pt", needs=("shards",)),
        Stage("dolly", "tokenize the bundled instructions with the prompt template", prepare_dolly.main,
              "prepare_dolly.py", dolly, {"input": shown(INSTRUCTIONS), "out_dir": shown(dolly),
                                          "max_len": train["block_size"], "no_progress": True, **prepare}),
        Stage("sft", f"instruction-tune it ({finetune['max_steps']} steps of {finetune['examples_per_step']} "
                     f"examples)", finetune_dolly.main, "finetune_dolly.py", sft,
              {"data_dir": shown(dolly), "init_from": shown(pretrain), "out_dir": shown(sft), **finetune, **system,
               "sample_count": 1, "pad_multiple": 16}, ckpt="last.pt", needs=("pretrain", "dolly")),
    ]


class StageFailed(Exception):
    """A stage (or the server) failed; the message says which and how."""


def run_stage(index, stage, fresh):
    """Run one stage unless its finished output can be reused; True when it ran."""
    print(f"\n[{index}/4] {stage.title}")
    status = "new" if fresh else stage.status()
    if status == "done":
        print(f"      reusing {shown(stage.out_dir)} (finished earlier; --force redoes it)")
        return False
    argv = stage.argv
    if status == "interrupted":
        at = argv.index("--init-from") + 1
        argv = argv[:at] + ["resume"] + argv[at + 1:]
        print("      (continuing the interrupted run from its checkpoint)")
    else:
        shutil.rmtree(stage.out_dir, ignore_errors=True)  # the demo's own folder: a fresh run starts empty
    command = shlex.join(["python", stage.script, *argv])
    print(f"$ {command}")
    stage.write_marker("running")
    t0 = time.time()
    try:
        result = stage.main(argv)
    except UserError as e:
        raise StageFailed(f"stage {index}/4 ({stage.key}) failed: {e}\n  command: {command}\n"
                          f"  finished stages are kept: fix the problem and run the demo again") from None
    if isinstance(result, dict) and result.get("stopped"):  # Ctrl+C / SIGTERM: the trainer saved a checkpoint
        raise KeyboardInterrupt
    stage.write_marker("done")
    print(f"[{index}/4] done in {time.time() - t0:.0f} s")
    return True

# ---------------------------------------------------------------- serving


def check_port_free(host, port):
    """A UserError when host:port cannot be bound, before minutes of training."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e}): stop what uses it, or pass "
                            f"--port N (or --no-serve)") from None


def serve(argv, base, smoke):
    """Start serve.py; print the URL and a curl example (smoke: one POST /generate), then stop it."""
    print(f"\n[serve] the chat page and the HTTP API\n$ {shlex.join(['python', *argv])}")
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, start_new_session=True)  # Ctrl+C reaches it once
    try:
        while True:  # the model loads in the background: /health says 503 until it is ready
            if proc.poll() is not None:
                raise StageFailed(f"serve.py exited with code {proc.returncode} (its error is above)")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2.0):  # a 503 raises (an OSError)
                    break
            except OSError:
                time.sleep(0.5)
        if smoke:
            body = {"prompt": EXAMPLE, "max_new_tokens": 16, "temperature": 0.8, "seed": 0}
            print(f"[smoke] POST {base}/generate {json.dumps(body)}")
            request = urllib.request.Request(base + "/generate", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120.0) as resp:
                    reply = json.load(resp)
            except OSError as e:
                raise StageFailed(f"POST /generate failed: {e}") from None
            print(f"[smoke] reply: {json.dumps(reply, ensure_ascii=False)}")
            if not reply.get("text"):
                raise StageFailed("POST /generate answered without text")
            return 0
        body = json.dumps({"prompt": EXAMPLE, "max_new_tokens": 64})
        print(f"\n  The chat page is ready: {base}/\n  Or from another terminal:\n    curl -s {base}/generate "
              f"-H 'Content-Type: application/json' -d '{body}'\n  Ctrl+C stops the server.\n")
        proc.wait()
        raise StageFailed(f"serve.py exited with code {proc.returncode}")
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:  # SIGINT: the server stops cleanly; SIGKILL if it hangs
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"{'[smoke] ' if smoke else ''}server stopped (exit code {proc.wait()})")

# ---------------------------------------------------------------- the run


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.no_serve:
        check_port_free(args.host, args.port)
    folder = "demo-smoke" if args.smoke else "demo"
    data_dir, out_dir = (os.path.join(os.path.abspath(root), folder) for root in (args.data_root, args.out_root))
    stages = build_stages(args.smoke, data_dir, out_dir, args.device)
    sft = shown(stages[-1].out_dir)
    serve_argv = ["serve.py", "--ckpt", sft, "--host", args.host, "--port", str(args.port), "--device", args.device,
                  "--model-name", MODEL_NAME]
    cwd, old_term = os.getcwd(), signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.chdir(ROOT)  # the commands are written for the repository root
    print(f"gpt2-instruct demo{' (smoke run)' if args.smoke else ''}: data in {shown(data_dir)}, checkpoints in "
          f"{shown(out_dir)}; finished stages are reused (--force redoes them); Ctrl+C stops.")
    try:
        ran = set()
        for i, stage in enumerate(stages, 1):
            if run_stage(i, stage, fresh=args.force or bool(ran & set(stage.needs))):
                ran.add(stage.key)
        print(f"\nmodel: {sft}/ckpt.pt\n  try it: "
              + shlex.join(["python", "inference.py", "--ckpt", sft, "--prompt", EXAMPLE]))
        if args.no_serve:
            print(f"  serve it: {shlex.join(['python', *serve_argv])}")
            return 0
        check_port_free(args.host, args.port)
        return serve(serve_argv, f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}",
                     args.smoke)
    except StageFailed as e:
        print(f"\ndemo: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; run it again to continue", file=sys.stderr, flush=True)
        return 130
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also through a pipe
    sys.exit(run_cli(main))
