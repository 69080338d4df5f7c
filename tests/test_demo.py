"""demo.py end to end in smoke mode (tiny model, a few steps per stage) in tmp_path:

- the first run prepares, trains, fine-tunes, serves on a free port, gets text from POST /generate
  and shuts the server down (exit 0);
- a second run reuses every stage (says so, runs no stage script, leaves the outputs untouched)
  and serves again;
- an interrupted pretraining (a checkpoint before the last step) is not taken for a finished one:
  the next run continues it with --init-from resume; --no-serve stops after fine-tuning;
- a stage that fails names the stage, its command and exit code (exit 1); a taken port is a
  usage error (exit 2) before any work; changed settings or a damaged output redo a stage.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402

STAGE_SCRIPTS = ("fineweb.py", "train_gpt2.py", "prepare_dolly.py", "finetune_dolly.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(*args, timeout=240):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def commands_run(output):
    """The stage scripts the demo started (from the commands it prints before running one)."""
    return [s for line in output.splitlines() if line.startswith("$ ")
            for s in STAGE_SCRIPTS if f" {s} " in line]


def smoke_reply(output):
    m = re.search(r"^\[smoke\] reply: (\{.*\})$", output, re.M)
    assert m, output[-3000:]
    return json.loads(m.group(1))


def ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {"data": str(base / "data"), "out": str(base / "out")}


@pytest.fixture(scope="module")
def first_run(roots):
    proc, out = run_demo("--smoke", "--data-root", roots["data"], "--out-root", roots["out"],
                         "--port", str(free_port()))
    return proc, out


def test_smoke_runs_every_stage_serves_and_answers(first_run, roots):
    proc, out = first_run
    assert proc.returncode == 0, out[-4000:]
    assert commands_run(out) == list(STAGE_SCRIPTS)  # each stage ran once, in order, its command shown
    assert "$ " in out and "--max-steps 4" in out
    reply = smoke_reply(out)
    assert isinstance(reply["text"], str) and reply["text"]
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["finish_reason"] in ("eos", "stop", "length")
    assert "[smoke] server stopped" in out and "smoke run passed" in out
    out_dir = os.path.join(roots["out"], "demo-smoke")
    assert ckpt_step(os.path.join(out_dir, "pretrain", "ckpt.pt")) == demo.SMOKE.max_steps
    assert ckpt_step(os.path.join(out_dir, "sft", "last.pt")) == demo.SMOKE.sft_max_steps
    for stage in demo.build_stages(demo.SMOKE, os.path.join(roots["data"], "demo-smoke"), out_dir, "cpu"):
        status, marker = demo.stage_status(stage)
        assert status == "done", (stage.key, marker)
        assert marker["argv"] == stage.argv and marker["seconds"] >= 0


def test_second_run_reuses_every_stage(first_run, roots):
    assert first_run[0].returncode == 0
    out_dir = os.path.join(roots["out"], "demo-smoke")
    watched = [os.path.join(out_dir, "pretrain", "ckpt.pt"), os.path.join(out_dir, "sft", "ckpt.pt"),
               os.path.join(roots["data"], "demo-smoke", "dolly", "train.npz")]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    proc, out = run_demo("--smoke", "--data-root", roots["data"], "--out-root", roots["out"],
                         "--port", str(free_port()))
    assert proc.returncode == 0, out[-4000:]
    assert commands_run(out) == []  # no stage script started: nothing redone
    assert out.count("reusing ") == 4, out
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
    assert smoke_reply(out)["text"]


def test_interrupted_pretraining_is_continued_not_reused(first_run, roots, tmp_path):
    """A pretraining stopped at step 2 of 4 (as Ctrl+C leaves it: checkpoint, marker 'running') resumes."""
    assert first_run[0].returncode == 0
    data_dir, out_dir = os.path.join(roots["data"], "demo-smoke"), str(tmp_path / "out" / "demo-smoke")
    stages = demo.build_stages(demo.SMOKE, data_dir, out_dir, "cpu")
    pretrain = stages[1]
    demo.write_marker(pretrain, "running")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, *pretrain.argv, "--stop-at-step", "2"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    assert ckpt_step(os.path.join(pretrain.out_dir, "ckpt.pt")) == 2
    assert demo.stage_status(pretrain) == ("interrupted", 2)

    proc, out = run_demo("--smoke", "--no-serve", "--data-root", roots["data"], "--out-root", str(tmp_path / "out"))
    assert proc.returncode == 0, out[-4000:]
    assert "continuing the interrupted run from step 2" in out
    assert "--init-from resume" in out
    assert commands_run(out) == ["train_gpt2.py", "finetune_dolly.py"]  # the data stages were reused
    assert ckpt_step(os.path.join(pretrain.out_dir, "ckpt.pt")) == demo.SMOKE.max_steps
    assert "serve it:" in out and "serve.py --ckpt" in out and "[serve]" not in out
    assert demo.stage_status(stages[3])[0] == "done"


def test_changed_settings_or_damaged_output_redo_a_stage(first_run, roots, tmp_path):
    assert first_run[0].returncode == 0
    data_dir, out_dir = os.path.join(roots["data"], "demo-smoke"), os.path.join(roots["out"], "demo-smoke")
    stages = demo.build_stages(demo.SMOKE, data_dir, out_dir, "cpu")
    other = demo.build_stages(dataclasses.replace(demo.SMOKE, max_steps=5), data_dir, out_dir, "cpu")
    assert demo.stage_status(other[1]) == ("new", "its settings changed")
    assert demo.stage_status(other[0])[0] == "done"  # the shards' command did not change

    # a copy of the finished fine-tuning folder whose last.pt got cut short
    sft = stages[3]
    copy = dataclasses.replace(sft, out_dir=str(tmp_path / "sft"))
    os.makedirs(copy.out_dir)
    for name in (demo.MARKER, "ckpt.pt"):
        with open(os.path.join(sft.out_dir, name), "rb") as src, open(os.path.join(copy.out_dir, name), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(sft.out_dir, "last.pt"), "rb") as src, open(os.path.join(copy.out_dir, "last.pt"), "wb") as dst:
        dst.write(src.read()[:1000])
    status, reason = demo.stage_status(copy)
    assert status == "new" and "incomplete" in reason and "last.pt" in reason


def test_failed_stage_names_stage_command_and_exit_code(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "books.jsonl"
    bad.write_text("this is not json\n")
    monkeypatch.setattr(demo, "BOOKS", str(bad))
    code = demo.main(["--smoke", "--no-serve", "--data-root", str(tmp_path / "data"),
                      "--out-root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "stage 1/4 (shards) failed with exit code 2" in err
    assert "command: " in err and "fineweb.py --input " + str(bad) in err
    stage = demo.build_stages(demo.SMOKE, str(tmp_path / "data" / "demo-smoke"), str(tmp_path / "out"), "cpu")[0]
    assert demo.stage_status(stage)[0] == "new"  # a failed stage is never taken for a finished one


def test_taken_port_is_a_usage_error_before_any_work(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc, out = run_demo("--smoke", "--data-root", str(tmp_path / "d"), "--out-root", str(tmp_path / "o"),
                             "--port", str(port), timeout=60)
    assert proc.returncode == 2
    assert f"error: cannot serve on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert "Traceback" not in out
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "o")
