"""lm-evaluation-harness scores 50 local HellaSwag rows against a live serve.py through its `local-completions`
model (echo + logprobs), with our HF export as its tokenizer, fully offline. Every log-likelihood it reports
must equal the one from the model's own fp32 forward pass on the same tokens.

lm-eval runs in its own process (its HF cache and offline switches in tmp_path) through its Python entry point,
simple_evaluate, with a TaskManager that indexes only our task: the `lm_eval` command also indexes the thousands of
built-in task files first, ~10 s that test nothing here."""

import json
import os
import subprocess
import sys

import numpy as np

import export_hf
import tokenizer
from conftest import ROOT
from test_openai_client import MODEL, make_checkpoint, reference_logprobs, serve_py

TASK_DIR = os.path.join("tests", "data", "lm_eval")  # relative: the task YAML names its data file from the root
# argv: model_args; prints the results with the per-request samples as one JSON object
# (batch size 8: a list of 8 token-id prompts per request)
RUN_LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
tasks = TaskManager(include_path=%r, include_defaults=False)
results = lm_eval.simple_evaluate(model="local-completions", model_args=sys.argv[1], tasks=["hellaswag_local"],
                                  task_manager=tasks, limit=50, batch_size=8, log_samples=True)
print(json.dumps(results, default=str))
""" % TASK_DIR


def encode_pair(context, continuation):
    """lm-eval's split of a (context, continuation) request into tokens: trailing spaces of the context move to
    the continuation, the whole string is encoded once, and the continuation is what follows the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def test_lm_eval_local_completions_matches_the_forward_pass(tmp_path):
    ckpt, model = make_checkpoint(tmp_path)
    export_hf.export(model, tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with serve_py(ckpt, tmp_path / "serve.log") as url:
        model_args = ",".join([
            f"base_url={url}/v1/completions", f"model={MODEL}", "tokenizer_backend=huggingface",
            f"tokenizer={tmp_path / 'hf'}", "max_retries=1",
        ])
        proc = subprocess.run([sys.executable, "-c", RUN_LM_EVAL, model_args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    results, samples = out["results"]["hellaswag_local"], out["samples"]["hellaswag_local"]
    assert len(samples) == results["sample_len"] == 50

    correct = []
    for sample in samples:
        mine, theirs = [], []
        for i, ((ll, _greedy),) in enumerate(sample["resps"]):
            context, continuation = sample["arguments"][i]
            assert continuation == " " + sample["doc"]["endings"][i]
            ctx, cont = encode_pair(context, continuation)
            mine.append(sum(reference_logprobs(model, ctx + cont)[len(ctx) - 1:]))
            theirs.append(float(ll))
        assert len(mine) == 4 and np.allclose(theirs, mine, rtol=0, atol=1e-3), (sample["doc_id"], theirs, mine)
        correct.append(int(np.argmax(mine)) == sample["doc"]["label"])
    assert abs(results["acc,none"] - float(np.mean(correct))) <= 1e-9
