import os
import sys

# One CPU thread for this process and every process a test starts (servers, engine processes, torchrun workers):
# the tiny models here gain nothing from a second thread, and on a busy 2-core machine two threads stall each
# other (three test_inference tests: 28 s on one thread, 131 s on two, back to back).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

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
def _one_thread():
    torch.set_num_threads(1)
