"""hellaswag.py: loading and acc / acc_norm scoring."""

import json
import lzma
import os

import pytest
import torch
from conftest import ROOT, tiny_config

import hellaswag
from common import UserError
from model import GPT
from tokenizer import encode

THE = encode(" the")[0]


class PredictsThe(torch.nn.Module):
    """A stand-in model whose every next-token prediction is ' the' (loss ~1e-4 for it, ~20 for anything else)."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits[..., THE] = 20.0
        return logits, None


# Row 1: ending 0 has six cheap ' the' tokens and one costly ' dog': the lowest loss per token (acc_norm
# picks it) but a higher sum than the single-token endings (acc picks ending 1, the first of the ties).
# Row 2: ending 1 (' the the') is cheapest both ways.
ROWS = [
    {"ind": 0, "ctx": "A man walks", "label": 0,
     "endings": ["the the the the the the dog", "dog", "cat", "house"]},
    {"ind": 1, "ctx": "She opens", "label": 1, "endings": ["cat", "the the", "dog dog", "house"]},
]


def write_rows(path, rows):
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def test_tokens_assumed_by_the_example():
    assert encode(" the the the the the the dog") == [THE] * 6 + encode(" dog")
    assert len(encode(" dog")) == len(encode(" cat")) == len(encode(" house")) == 1


def test_acc_norm_on_hand_made_rows(tmp_path):
    examples = hellaswag.load_examples(write_rows(tmp_path / "hs.jsonl.xz", ROWS))
    assert [e["label"] for e in examples] == [0, 1]
    result = hellaswag.evaluate(PredictsThe(), examples, "cpu", batch_examples=2)
    assert result == {"acc_norm": 1.0, "acc": 0.5, "n": 2}
    mean, summed = hellaswag.score_examples(PredictsThe(), examples[:1], "cpu")[0]
    cheap = -torch.log_softmax(torch.tensor([20.0] + [0.0] * 50303), 0)[0].item()
    dear = 20.0 + cheap
    assert summed == pytest.approx([6 * cheap + dear, dear, dear, dear], rel=1e-5)
    assert mean == pytest.approx([(6 * cheap + dear) / 7, dear, dear, dear], rel=1e-5)


def test_batched_scores_equal_one_by_one(tmp_path):
    examples = hellaswag.load_examples(os.path.join(ROOT, "tests", "data", "hellaswag_val_200.jsonl"), limit=6)
    assert len(examples) == 6 and all(len(e["endings"]) == 4 for e in examples)
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    batched = hellaswag.score_examples(model, examples, "cpu", batch_examples=3)  # right-padded rows
    single = hellaswag.score_examples(model, examples, "cpu", batch_examples=1)
    for (m1, s1), (m2, s2) in zip(batched, single):
        assert m1 == pytest.approx(m2, abs=1e-4) and s1 == pytest.approx(s2, abs=1e-3)
    # against a direct computation for one ending, no padding at all
    ex = examples[0]
    ctx, end = encode(ex["ctx"]), encode(" " + ex["endings"][2])
    tokens = torch.tensor([ctx + end])
    with torch.no_grad():
        logits, _ = model(tokens)
    logp = torch.log_softmax(logits[0, :-1, :50257].float(), -1)
    losses = -logp[torch.arange(len(ctx) - 1, tokens.size(1) - 1), tokens[0, len(ctx):]]
    assert single[0][0][2] == pytest.approx(losses.mean().item(), abs=1e-4)
    assert single[0][1][2] == pytest.approx(losses.sum().item(), abs=1e-3)


def test_bad_rows_are_clear_errors(tmp_path):
    bad = dict(ROWS[0], endings=["only", "three", "endings"])
    with pytest.raises(UserError, match="endings"):
        hellaswag.load_examples(write_rows(tmp_path / "a.jsonl.xz", [bad]))
    with pytest.raises(UserError, match="label"):
        hellaswag.load_examples(write_rows(tmp_path / "b.jsonl.xz", [dict(ROWS[0], label=7)]))
    with pytest.raises(UserError, match="not found"):
        hellaswag.load_examples(tmp_path / "missing.jsonl")


def test_cli_scores_a_checkpoint(tmp_path, capsys):
    from checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = GPT(tiny_config())
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", kind="pretrain", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=0)
    result = hellaswag.main(["--model", str(ckpt), "--file", str(write_rows(tmp_path / "hs.jsonl.xz", ROWS)),
                             "--device", "cpu"])
    assert result["n"] == 2 and 0.0 <= result["acc_norm"] <= 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
