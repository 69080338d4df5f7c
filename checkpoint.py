"""Checkpoint format, defined once (DESIGN.md "Checkpoints").

`{out_dir}/ckpt.pt`, loadable with torch.load(path, weights_only=True): only tensors and plain
Python containers inside, never pickled classes. Keys:
  format_version (1), kind ("pretrain" | "sft"), model (state dict, canonical names), config
  (GPTConfig fields), step, optimizer, train_state, rng, args, metrics.
Written atomically: a crash leaves the previous checkpoint, never a partial one.
"""

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from common import UserError, atomic_path

FORMAT_VERSION = 1
KINDS = ("pretrain", "sft")
REQUIRED_KEYS = ("format_version", "kind", "model", "config")
CKPT_NAME = "ckpt.pt"
_WRAPPERS = ("_orig_mod", "module")  # name parts added by torch.compile and DDP


class CheckpointError(UserError):
    """Missing, truncated, foreign or incompatible checkpoint file."""


def clean_state_dict(state):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) parts of parameter names, at any depth."""
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p not in _WRAPPERS]
        out[".".join(parts)] = value
    return out


def resolve_path(path):
    """A checkpoint file, or a folder holding ckpt.pt."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, CKPT_NAME)
    return path


def _plain(value):
    """Make args JSON-like (paths -> str) so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_checkpoint(path, *, kind, model_state, config, step, optimizer=None, train_state=None,
                    rng=None, args=None, metrics=None):
    """Write a checkpoint atomically. `config` is a dict (GPTConfig.to_dict())."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": clean_state_dict(model_state),
        "config": dict(config),
        "step": int(step),
        "optimizer": optimizer,
        "train_state": train_state or {},
        "rng": rng or {},
        "args": _plain(args or {}),
        "metrics": _plain(metrics or {}),
    }
    path = resolve_path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; any problem is a CheckpointError with a one-line message."""
    path = resolve_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "zip" in msg.lower() or "central directory" in msg.lower() or isinstance(e, EOFError):
            raise CheckpointError(f"checkpoint is truncated or corrupt: {path} ({msg})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {msg}") from None
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else "unpickling failed"
        raise CheckpointError(f"not a PyTorch checkpoint, or corrupt: {path} ({first[:120]})") from None
    except Exception as e:  # anything else torch.load can raise on foreign bytes
        raise CheckpointError(f"not a readable checkpoint: {path} ({type(e).__name__})") from None
    validate(ckpt, path)
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def validate(ckpt, path="checkpoint"):
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a gpt2-instruct checkpoint (needs keys {', '.join(REQUIRED_KEYS)}; has {have})"
        )
    version = ckpt["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version}; this code reads version {FORMAT_VERSION}"
        )
    if ckpt["kind"] not in KINDS:
        raise CheckpointError(f"{path} has unknown kind {ckpt['kind']!r} (expected one of {', '.join(KINDS)})")


def model_from_checkpoint(ckpt):
    """Build a GPT from a loaded checkpoint dict; a shape mismatch is a CheckpointError."""
    from model import GPT, GPTConfig

    try:
        config = GPTConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint has an invalid model config: {e}") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint weights do not fit its config: {lines[1] if len(lines) > 1 else lines[0]}") from None
    return model


# ---------------------------------------------------------------------- RNG state as tensors

def capture_rng_state():
    """Every RNG we use, as tensors and plain containers (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    if not state:
        return
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])
