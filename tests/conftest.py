import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402


def tiny_config(**overrides):
    cfg = dict(block_size=128, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
