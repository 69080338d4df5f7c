import os
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from checkpoint import (CheckpointError, capture_rng_state, clean_state_dict, load_checkpoint,
                        model_from_checkpoint, restore_rng_state, save_checkpoint)


def _save(path, model, **kw):
    opt = model.configure_optimizers(0.1, 1e-3)
    loss = model(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))[1]
    loss.backward()
    opt.step()
    return save_checkpoint(path, kind="pretrain", model_state=model.state_dict(),
                           config=model.config.to_dict(), step=7, optimizer=opt.state_dict(),
                           train_state={"epoch": 1, "position": 123}, rng=capture_rng_state(),
                           args={"out_dir": tmp_as_path(path), "lr": 1e-3}, metrics={"val_loss": 3.2}, **kw)


def tmp_as_path(p):
    from pathlib import Path
    return Path(p)


def test_round_trip_weights_only(tmp_path, tiny_model):
    path = _save(tmp_path, tiny_model)
    assert path == str(tmp_path / "ckpt.pt")
    raw = torch.load(path, weights_only=True)  # no pickled classes inside
    assert raw["format_version"] == 1 and raw["kind"] == "pretrain" and raw["step"] == 7
    ckpt = load_checkpoint(tmp_path)  # a folder resolves to its ckpt.pt
    model = model_from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], tiny_model(idx)[0])
    assert ckpt["train_state"] == {"epoch": 1, "position": 123}
    assert ckpt["args"]["out_dir"] == str(tmp_path)  # Path -> str
    opt = model.configure_optimizers(0.1, 1e-3)
    opt.load_state_dict(ckpt["optimizer"])


def test_compiled_and_ddp_prefixes_are_normalised(tmp_path, tiny_model):
    state = {"_orig_mod.module." + k: v for k, v in tiny_model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", kind="sft", model_state=state, config=tiny_model.config.to_dict(), step=0)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert set(ckpt["model"]) == set(tiny_model.state_dict())
    model_from_checkpoint(ckpt)


def test_compiled_model_state_dict_loads(tmp_path, tiny_model):
    compiled = torch.compile(tiny_model)  # wrapping alone adds the _orig_mod. prefix
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(tmp_path, kind="pretrain", model_state=compiled.state_dict(),
                    config=tiny_model.config.to_dict(), step=1)
    model_from_checkpoint(load_checkpoint(tmp_path))


def test_clean_state_dict_keeps_inner_names():
    assert list(clean_state_dict({"a.base_module.weight": 1})) == ["a.base_module.weight"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path, tiny_model):
    path = _save(tmp_path, tiny_model)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_foreign_torch_file(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a gpt2-instruct checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_incompatible_version_and_shapes(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path, kind="pretrain", model_state=tiny_model.state_dict(),
                           config=tiny_model.config.to_dict(), step=0)
    ckpt = torch.load(path, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)
    ckpt["format_version"] = 1
    ckpt["config"] = tiny_config(n_embd=32).to_dict()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(path))


def test_crash_mid_write_keeps_old_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = _save(tmp_path, tiny_model)
    before = open(path, "rb").read()

    def exploding_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, kind="pretrain", model_state=tiny_model.state_dict(),
                        config=tiny_model.config.to_dict(), step=8)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
