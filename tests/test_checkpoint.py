import os

import pytest
import torch
from conftest import tiny_config

from checkpoint import (CheckpointError, capture_rng_state, clean_state_dict, load_checkpoint, load_model,
                        model_from_checkpoint, restore_rng_state, save_checkpoint)
from common import UserError, clean_stale_temps
from lora import LoRAConfig, apply_lora


def _save(path, model, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
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
    torch.manual_seed(3)
    state = capture_rng_state()
    a = torch.rand(1).item()
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.rand(1).item() == a


# ---------------------------------------------------------------------- load_model: the one loader

def _one_line_error(exc_type, fn, *args, match=None):
    with pytest.raises(exc_type, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_load_model_from_file_and_folder(tmp_path, tiny_model):
    _save(tmp_path, tiny_model)
    idx = torch.randint(0, 100, (1, 16))
    for spec in (tmp_path, tmp_path / "ckpt.pt"):
        model, info = load_model(spec)
        assert not model.training
        assert info["kind"] == "pretrain" and info["step"] == 7 and info["metrics"] == {"val_loss": 3.2}
        assert info["config"] == tiny_model.config.to_dict() and info["name"] == tmp_path.name
        assert info["path"] == os.path.abspath(spec)
        with torch.no_grad():
            assert torch.equal(model(idx)[0], tiny_model(idx)[0])
    model, _ = load_model(tmp_path, dtype=torch.bfloat16, dropout=0.25)
    assert model.config.dropout == 0.25 and next(model.parameters()).dtype == torch.bfloat16


def _hf_folder(path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path)
    return hf


def test_load_model_hf_folder_matches_transformers(tmp_path):
    hf = _hf_folder(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    model, info = load_model(tmp_path)
    assert info["kind"] == "hf" and info["step"] is None and info["config"]["n_embd"] == 32
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_load_model_refuses_pickles_and_bad_hf_folders(tmp_path):
    _hf_folder(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    _one_line_error(UserError, load_model, tmp_path, match="pickled pytorch_model.bin .* refused")
    (tmp_path / "model.safetensors").write_bytes(os.urandom(1000))
    _one_line_error(CheckpointError, load_model, tmp_path, match="not readable safetensors")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(UserError, load_model, tmp_path, match="config.json: not readable JSON")
    os.remove(tmp_path / "config.json")
    _one_line_error(UserError, load_model, tmp_path, match="neither ckpt.pt nor an HF GPT-2 model")
    _one_line_error(UserError, load_model, tmp_path / "nope", match="model not found")


@pytest.mark.parametrize("n_embd, match", [(1e6, "n_embd must be an integer"), (1_000_000, "GiB of weights"),
                                           (-64, "n_embd must be >= 1")])
def test_absurd_configs_are_refused_before_allocating(tmp_path, tiny_model, n_embd, match):
    save_checkpoint(tmp_path, kind="pretrain", model_state=tiny_model.state_dict(),
                    config=dict(tiny_model.config.to_dict(), n_embd=n_embd, n_head=1), step=0)
    _one_line_error(CheckpointError, load_model, tmp_path, match=match)


def test_non_finite_weights_are_refused(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state["transformer.h.1.mlp.c_fc.weight"] = torch.full_like(state["transformer.h.1.mlp.c_fc.weight"], float("nan"))
    save_checkpoint(tmp_path, kind="sft", model_state=state, config=tiny_model.config.to_dict(), step=0)
    _one_line_error(CheckpointError, load_model, tmp_path, match="h.1.mlp.c_fc.weight holds NaN or infinite")


def test_flipped_bytes_are_refused(tmp_path, tiny_model):
    path = _save(tmp_path, tiny_model)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    open(path, "wb").write(bytes(data))
    _one_line_error(CheckpointError, load_model, tmp_path, match="corrupt")


def test_lora_checkpoint_loads_with_its_adapters(tmp_path, tiny_model):
    cfg = LoRAConfig(rank=2, targets=("c_attn",))
    apply_lora(tiny_model, cfg)
    tiny_model.eval()  # the new adapters' dropout too
    with torch.no_grad():
        tiny_model.transformer.h[0].attn.c_attn.lora_B.fill_(0.01)
    save_checkpoint(tmp_path, kind="sft", model_state=tiny_model.state_dict(), config=tiny_model.config.to_dict(),
                    step=3, lora=cfg.to_dict())
    model, _ = load_model(tmp_path)
    idx = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], tiny_model(idx)[0])


def test_clean_stale_temps_removes_only_atomic_path_leftovers(tmp_path):
    keep = ["ckpt.pt", "notes.tmp", ".hidden.tmp", "log.jsonl"]
    for name in keep + [".ckpt.pt.ab12_xyz.tmp", ".log.jsonl.q9w8e7r6.tmp"]:
        (tmp_path / name).write_text("x")
    clean_stale_temps(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
