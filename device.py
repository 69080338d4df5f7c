"""The torch side of the shared helpers: device and dtype choice, uploads to a device, torchrun's process group."""

import contextlib
import os
from dataclasses import dataclass

import torch

from cli import UserError


def pick_device(device=None):
    """'auto'/None -> cuda if present, else mps, else cpu."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device)


def upload(values, dtype, device):
    """Host values (a list or a numpy array) as a tensor on device; to CUDA through pinned memory, without
    waiting (the copy queues on the current stream)."""
    t = torch.as_tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype, device):
    """'auto'/None -> bf16 on CUDA GPUs that support it, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(DTYPES))}")
        return DTYPES[dtype]
    return torch.bfloat16 if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def autocast(device, dtype):
    """Autocast to dtype on the device; none for float32 (or None)."""
    return contextlib.nullcontext() if dtype in (None, torch.float32) else torch.autocast(device.type, dtype=dtype)


@dataclass
class DistInfo:
    enabled: bool
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device=None):
    """-> DistInfo: torch.distributed initialised under torchrun (NCCL on GPU, gloo on CPU), else one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(False, 0, 1, pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device("cpu")
    if pick_device(device).type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl", device_id=dev)
    else:
        torch.distributed.init_process_group("gloo")
    return DistInfo(world > 1, rank, world, dev)


def teardown_distributed(info):
    if (info.enabled or "RANK" in os.environ) and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
