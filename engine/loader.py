"""Loading a model for generation: checkpoint.load_model, then eval / device / dtype, and on CPU either
dynamic int8 Linears or the (in, out) weight layout that single-row matmuls read faster."""


import warnings

import torch
from torch import nn

from checkpoint import load_model
from common import UserError
from device import pick_device, pick_dtype


def quantize_int8(model):
    """Dynamic int8 quantization of every nn.Linear (in place), for CPU inference: weights int8 per output
    channel, activations quantized per call (torch.ao's quantize_dynamic: deprecated upstream but present
    and fast in torch 2.11 and 2.13; the tied lm_head gets its own int8 copy, the embedding stays float)."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:
        raise UserError(f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic; "
                        "run without --quantize") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao and quantized dtypes
        try:
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        except RuntimeError:  # an engine without per-channel dynamic linear: per-tensor scales
            quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


class InOutLinear(nn.Module):
    """nn.Linear with its weight stored (in, out), as GPT-2's Conv1D: y = x @ W_t + b. Single-row matmuls
    (decoding) read this layout about 1.8x faster than (out, in) on the CPU BLAS here (the 154 MB lm_head:
    7.0 ms against 12.4 ms), and decoding is bound by those reads."""

    def __init__(self, linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):  # (..., in) -> (..., out)
        flat = x.reshape(-1, x.size(-1))
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


class TiedEmbedding(nn.Module):
    """The token embedding read from a tied InOutLinear lm_head's (C, V) weight: no second copy."""

    def __init__(self, weight_t):
        super().__init__()
        self.weight_t = weight_t  # the lm_head's parameter, shared

    def forward(self, idx):
        return nn.functional.embedding(idx, self.weight_t.t())  # rows of the (V, C) view


def use_in_out_layout(model):
    """Replace every nn.Linear of a GPT by an InOutLinear (in place; for inference only: parameter names
    change). A tied embedding reads the lm_head's new weight."""
    tied = model.lm_head.weight is model.transformer.wte.weight
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, InOutLinear(child))
    if tied:
        model.transformer.wte = TiedEmbedding(model.lm_head.weight_t)
    return model


def prepare_model(model, device, dtype, quantize=None):
    """Ready a model for generation, in place: eval, no grads, on device in dtype; quantize="int8"
    for dynamic int8 Linears (CPU, fp32); other CPU models get the (in, out) weight layout."""
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if quantize == "int8":
        quantize_int8(model)
    elif torch.device(device).type == "cpu":
        use_in_out_layout(model)
    return model


def load_model_from_checkpoint(path, device=None, dtype=None, quantize=None):
    """checkpoint.load_model, then prepare_model -> (model, info). device: None/"auto" = CUDA > MPS > CPU.
    dtype: None/"auto" = bf16 on CUDA, fp32 elsewhere. quantize: None, "none" or "int8". Bad input raises
    a one-line UserError."""
    try:
        device = pick_device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    dtype = pick_dtype(dtype, device)
    if quantize not in (None, "none", "int8"):
        raise UserError(f"quantize must be 'int8' or none, got {quantize!r}")
    quantize = None if quantize == "none" else quantize
    if quantize == "int8" and (device.type != "cpu" or dtype != torch.float32):
        raise UserError(f"quantize=int8 runs on CPU in float32 only (asked: {device.type}, {dtype})")
    model, info = load_model(path)
    info.update(device=str(device), dtype=str(dtype).replace("torch.", ""), quantize=quantize,
                n_params=model.num_params(), instruction_tuned=info["kind"] == "sft")
    return prepare_model(model, device, dtype, quantize), info
