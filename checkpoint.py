"""Checkpoints: the one format we write (docs/design.md, Checkpoints: weights_only-loadable, written
atomically), and the one loader for every model we read (ours, an HF GPT-2 folder, an OpenAI GPT-2 name)."""

import json
import os
import pickle
import zipfile

import torch

from common import UserError, atomic_path
from lora import LoRAConfig, apply_lora
from model import GPT, GPT2_VOCAB, PRETRAINED_CONFIGS, GPTConfig, hf_to_ours

FORMAT_VERSION = 1
KINDS = ("pretrain", "sft")
REQUIRED_KEYS = ("format_version", "kind", "model", "config")
CKPT_NAME = "ckpt.pt"
_WRAPPERS = ("_orig_mod", "module")  # name parts added by torch.compile and DDP
SHAPE_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


class CheckpointError(UserError):
    """Missing, truncated, corrupt, foreign or incompatible checkpoint file, or non-finite weights."""


def clean_state_dict(state):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) parts of parameter names, at any depth."""
    return {".".join(p for p in key.split(".") if p not in _WRAPPERS): value for key, value in state.items()}


def resolve_path(path):
    """A checkpoint file, or a folder holding ckpt.pt."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def save_checkpoint(path, *, kind, model_state, config, step, optimizer=None, train_state=None,
                    rng=None, args=None, metrics=None, lora=None):
    """Write a checkpoint atomically. `config` is a dict (GPTConfig.to_dict()), `lora` a LoRAConfig dict."""
    assert kind in KINDS, kind
    ckpt = {
        "format_version": FORMAT_VERSION, "kind": kind, "model": clean_state_dict(model_state),
        "config": dict(config), "step": int(step), "optimizer": optimizer, "train_state": train_state or {},
        "rng": rng or {},  # args and metrics JSON-like (paths -> str), so weights_only loading accepts them
        "args": json.loads(json.dumps(args or {}, default=str)),
        "metrics": json.loads(json.dumps(metrics or {}, default=str)), "lora": lora,  # None: no adapters
    }
    path = resolve_path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)  # a zip whose members carry CRC32s: load_checkpoint checks them
    return path


def load_checkpoint(path):
    """Load and validate one of our checkpoints; any problem is a CheckpointError with a one-line message."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:  # reads every byte once: flipped bits fail their CRC32 here
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint is truncated or corrupt: {path} ({str(e).splitlines()[0]})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint is corrupt: {path} (member {bad} fails its CRC check)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"not a weights-only checkpoint, or corrupt: {path} "
                              f"({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # anything else torch.load can raise on foreign bytes
        raise CheckpointError(f"not a readable checkpoint: {path} ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a gpt2-instruct checkpoint "
                              f"(needs keys {', '.join(REQUIRED_KEYS)}; has {have})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {ckpt['format_version']}; "
                              f"this code reads version {FORMAT_VERSION}")
    if ckpt["kind"] not in KINDS:
        raise CheckpointError(f"{path} has unknown kind {ckpt['kind']!r} (expected one of {', '.join(KINDS)})")
    return ckpt


def build_model(config, where="checkpoint", dropout=None):
    """An untrained GPT of a config dict; malformed or absurd configs are refused before allocating."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: the model config is not a mapping")
    for key in SHAPE_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where}: model config {key} must be an integer, got {value!r}")
    config = dict(config) if dropout is None else dict(config, dropout=dropout)
    try:
        cfg = GPTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config: {e}") from None
    C = cfg.n_embd  # fp32 weights: embeddings + 12 C^2 per block (attention 4 C^2, MLP 8 C^2)
    need = 4 * ((cfg.vocab_size + cfg.block_size) * C + cfg.n_layer * 12 * C * C)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise CheckpointError(f"{where}: model config ({cfg.n_layer} layers, n_embd {C}, vocab {cfg.vocab_size}) "
                              f"needs {need / 2 ** 30:,.0f} GiB of weights, more than this machine's "
                              f"{have / 2 ** 30:,.0f} GiB of memory")
    return GPT(cfg)


def _fill(model, state, where):
    """Load a state dict strictly; refuse shapes that do not fit and non-finite weights."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        misfit = lines[1] if len(lines) > 1 else lines[0]  # lines[0] is torch's header
        raise CheckpointError(f"{where}: weights do not fit its config: {misfit}") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: weight {name} holds NaN or infinite values")
    return model


def model_from_checkpoint(ckpt, where="checkpoint", dropout=None):
    """The GPT a loaded checkpoint dict describes (with its LoRA adapters, if any), weights checked."""
    model = build_model(ckpt["config"], where, dropout)
    if ckpt.get("lora"):
        apply_lora(model, LoRAConfig(**ckpt["lora"]))
    return _fill(model, ckpt["model"], where)


def _load_hf(folder, dropout=None):
    """The GPT of an HF GPT-2 folder (config.json + model.safetensors, never a pickle), or of a GPT-2 name (online)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(folder):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(f"openai-community/{folder}",
                                       allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:  # offline, hub down, missing package: one clear message
            raise UserError(f"could not download {folder!r} from the Hugging Face hub ({type(e).__name__}); offline? "
                            f"pass a local HF folder holding config.json and model.safetensors") from None
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
        raise UserError(f"{folder}: no model.safetensors" + (
            " (a pickled pytorch_model.bin can run code when loaded, so it is refused: convert it to safetensors)"
            if pickled else ""))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}/config.json: not readable JSON ({type(e).__name__})") from None
    model_type = hf.get("model_type", "gpt2") if isinstance(hf, dict) else None
    if model_type != "gpt2":
        raise UserError(f"{folder} does not hold a GPT-2 model (model_type {model_type!r})")
    config = {"block_size": hf.get("n_positions", hf.get("n_ctx", 1024)), "bias": True,
              "vocab_size": hf.get("vocab_size", GPT2_VOCAB), **{k: hf.get(k) for k in ("n_layer", "n_head", "n_embd")}}
    model = build_model(config, f"{folder}/config.json", dropout)
    try:
        state = hf_to_ours(load_file(weights))
    except (SafetensorError, OSError, KeyError) as e:
        raise CheckpointError(f"{weights}: not readable safetensors ({str(e).splitlines()[0][:120]})") from None
    return _fill(model, state, weights)


def load_model(spec, device="cpu", dtype=None, dropout=None):
    """-> (GPT in eval mode, info) from our checkpoint (file or folder), an HF GPT-2 folder or a GPT-2 name.
    info: kind ("pretrain" | "sft" | "hf" | "openai"), config (dict), step, path, name, metrics.
    Every user mistake is a UserError with one line; corrupt files and non-finite weights a CheckpointError."""
    spec = os.fspath(spec)
    full = os.path.abspath(spec)
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, CKPT_NAME)):
        ckpt = load_checkpoint(spec)
        model = model_from_checkpoint(ckpt, resolve_path(spec), dropout)
        folder = full if os.path.isdir(full) else os.path.dirname(full)
        info = {"kind": ckpt["kind"], "step": ckpt["step"], "metrics": ckpt.get("metrics") or {}, "path": full,
                "name": os.path.basename(folder) or full}
    elif (local := os.path.isdir(spec)) or spec in PRETRAINED_CONFIGS:
        if local and not os.path.isfile(os.path.join(spec, "config.json")):
            raise UserError(f"{spec} holds neither {CKPT_NAME} nor an HF GPT-2 model (config.json + model.safetensors)")
        model = _load_hf(spec, dropout)
        info = {"kind": "hf" if local else "openai", "step": None, "metrics": {}, "path": full if local else spec,
                "name": os.path.basename(full.rstrip("/")) if local else spec}
    else:
        raise UserError(f"model not found: {spec!r} (expected a {CKPT_NAME} file, a folder holding one, an HF "
                        f"GPT-2 folder, or one of {', '.join(PRETRAINED_CONFIGS)}); make one with make demo "
                        f"(out/demo/sft) or python finetune_dolly.py (out/dolly)")
    model.to(device=device, dtype=dtype)
    return model.eval(), {**info, "config": model.config.to_dict()}


def capture_rng_state():
    """torch's RNG states, the only global ones a run draws from (dropout; data order and samples are seeded)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):  # a resumable checkpoint always holds one
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
