"""demo.py end to end in smoke mode (tiny model, a few steps per stage) in tmp_path:

- the first run prepares, trains, fine-tunes, serves on a free port under the demo's model name, gets
  text from POST /generate and shuts the server down (exit 0);
- a second run reuses every stage (runs no stage script, leaves the outputs untouched) and serves again;
- Ctrl+C during pretraining checkpoints and exits 130; the next run continues it with --init-from resume
  and redoes the stage that reads it; --no-serve stops after fine-tuning;
- changed settings redo a stage; a failing stage names itself and its command (exit 1); a taken
  port is a usage error (exit 2) before any work.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import demo

STAGE_SCRIPTS = ("fineweb.py", "train_gpt2.py", "prepare_dolly.py", "finetune_dolly.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(*args, timeout=300):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--smoke", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def commands_run(output):
    """The stage scripts the demo ran (from the commands it prints before running one)."""
    return [s for line in output.splitlines() if line.startswith("$ python ") for s in STAGE_SCRIPTS
            if line.startswith(f"$ python {s} ")]


def smoke_reply(output):
    m = re.search(r"^\[smoke\] reply: (\{.*\})$", output, re.M)
    assert m, output[-3000:]
    return json.loads(m.group(1))


def ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def stages_in(roots, out=None):
    return demo.build_stages(True, os.path.join(roots["data"], "demo-smoke"),
                             os.path.join(out or roots["out"], "demo-smoke"), "cpu")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {"data": str(base / "data"), "out": str(base / "out")}


@pytest.fixture(scope="module")
def first_run(roots):
    return run_demo("--data-root", roots["data"], "--out-root", roots["out"], "--port", free_port())


def test_smoke_runs_every_stage_serves_and_answers(first_run, roots):
    proc, out = first_run
    assert proc.returncode == 0, out[-4000:]
    assert commands_run(out) == list(STAGE_SCRIPTS)  # each stage ran once, in order, its command shown
    assert f"--model-name {demo.MODEL_NAME}" in out
    reply = smoke_reply(out)
    assert reply["text"] and reply["model"] == demo.MODEL_NAME and reply["usage"]["completion_tokens"] >= 1
    assert "[smoke] server stopped (exit code 0)" in out
    pretrain, sft = (os.path.join(roots["out"], "demo-smoke", name) for name in ("pretrain", "sft"))
    assert ckpt_step(os.path.join(pretrain, "ckpt.pt")) == demo.SMOKE_PRETRAIN["max_steps"]
    assert ckpt_step(os.path.join(sft, "last.pt")) == demo.SMOKE_FINETUNE["max_steps"]
    assert [s.status() for s in stages_in(roots)] == ["done"] * 4


def test_second_run_reuses_every_stage(first_run, roots):
    assert first_run[0].returncode == 0
    out_dir = os.path.join(roots["out"], "demo-smoke")
    watched = [os.path.join(out_dir, "pretrain", "ckpt.pt"), os.path.join(out_dir, "sft", "ckpt.pt"),
               os.path.join(roots["data"], "demo-smoke", "dolly", "train.npz")]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    proc, out = run_demo("--data-root", roots["data"], "--out-root", roots["out"], "--port", free_port())
    assert proc.returncode == 0, out[-4000:]
    assert commands_run(out) == [] and out.count("reusing ") == 4, out
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
    assert smoke_reply(out)["text"]


def test_ctrl_c_during_pretraining_is_continued_by_the_next_run(first_run, roots, tmp_path):
    """Ctrl+C once pretraining has logged a step: it checkpoints and stops (exit 130); the next run resumes it."""
    assert first_run[0].returncode == 0
    pretrain, sft = stages_in(roots, tmp_path)[1::2]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "demo.py", "--smoke", "--no-serve", "--data-root", roots["data"],
                             "--out-root", str(tmp_path)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, "".join(out)[-3000:]
    assert "demo: interrupted" in "".join(out)
    step = ckpt_step(os.path.join(pretrain.out_dir, "ckpt.pt"))
    assert 1 <= step < demo.SMOKE_PRETRAIN["max_steps"] and pretrain.status() == "interrupted"

    proc, out = run_demo("--no-serve", "--data-root", roots["data"], "--out-root", tmp_path)
    assert proc.returncode == 0, out[-4000:]
    assert "continuing the interrupted run" in out and "--init-from resume" in out
    assert commands_run(out) == ["train_gpt2.py", "finetune_dolly.py"]  # the data stages were reused
    assert ckpt_step(os.path.join(pretrain.out_dir, "ckpt.pt")) == demo.SMOKE_PRETRAIN["max_steps"]
    assert "serve it: python serve.py --ckpt" in out and "[serve]" not in out
    assert sft.status() == "done"


def test_changed_settings_redo_a_stage(first_run, roots, monkeypatch):
    assert first_run[0].returncode == 0
    monkeypatch.setitem(demo.SMOKE_PRETRAIN, "max_steps", 5)
    shards, pretrain, dolly, _ = stages_in(roots)
    assert (shards.status(), pretrain.status(), dolly.status()) == ("done", "new", "done")


def test_failed_stage_names_stage_and_command(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "books.jsonl"
    bad.write_text("this is not json\n")
    monkeypatch.setattr(demo, "BOOKS", str(bad))
    code = demo.main(["--smoke", "--no-serve", "--data-root", str(tmp_path / "data"),
                      "--out-root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"stage 1/4 (shards) failed: {bad}:1: not valid JSON" in err
    assert f"command: python fineweb.py --input {bad}" in err
    assert stages_in({"data": str(tmp_path / "data"), "out": str(tmp_path / "out")})[0].status() == "new"


def test_taken_port_is_a_usage_error_before_any_work(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc, out = run_demo("--data-root", tmp_path / "d", "--out-root", tmp_path / "o", "--port", port, timeout=60)
    assert proc.returncode == 2
    assert f"error: cannot serve on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert "Traceback" not in out
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "o")
