import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.sampling_params import check_inputs  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def embed_all(engine, inputs):
    """Embeddings of id lists through the engine's steps (checked first, as the server's edge does)."""
    check_inputs(inputs, engine.config.block_size)
    engine.add_embedding("embed_all", inputs)
    while engine.has_work():
        engine.step()
    (job, vectors), = engine.embedded
    engine.embedded.clear()
    return vectors.tolist()


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
