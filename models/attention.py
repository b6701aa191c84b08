"""One attention function for the pack's transformers.

`attention(q, k, v, backend)` takes q [B, Lq, H, D], k/v [B, Lk, H, D] (the layout the projections
produce, no copies) and returns [B, Lq, H·D]. Unmasked, non-causal, scale 1/√D.

Backends:
  * "sdpa" (default): torch.nn.functional.scaled_dot_product_attention on [B, H, L, D] views. torch
    picks its fastest kernel (cuDNN / flash on recent NVIDIA GPUs, a fused kernel on CPU);
  * "flash_attn": flash-attn's `flash_attn_func` when the package is importable (fp16/bf16 CUDA only);
  * "sageattention": SageAttention's `sageattn` when importable (fp16/bf16 CUDA only).
Where an optional backend cannot run the given tensors (CPU, float32) the call falls back to SDPA.
"""
import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash_attn", "sageattention")

_impl = {}


def available_backends():
    """Backends whose package can be imported here (sdpa always)."""
    names = ["sdpa"]
    for name in BACKENDS[1:]:
        if _load(name) is not None:
            names.append(name)
    return names


def _load(name):
    if name not in _impl:
        fn = None
        try:
            if name == "flash_attn":
                fn = importlib.import_module("flash_attn").flash_attn_func
            elif name == "sageattention":
                fn = importlib.import_module("sageattention").sageattn
        except Exception:  # not installed, or built for another torch/CUDA
            fn = None
        _impl[name] = fn
    return _impl[name]


def check_backend(name):
    """Validate a backend name; an optional backend must be importable."""
    name = name or "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "sdpa" and _load(name) is None:
        raise ValueError(
            f"attention backend {name!r} is not available: its Python package is not installed or does not "
            f"import with this torch build. Install it, or pick 'sdpa' (always available)."
        )
    return name


def attention(q, k, v, backend="sdpa"):
    """Unmasked attention: q [B, Lq, H, D], k, v [B, Lk, H, D] -> [B, Lq, H·D] (dtype of q)."""
    b, lq, h, d = q.shape
    fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn" and fast:
        out = _load("flash_attn")(q, k, v)
        return out.reshape(b, lq, h * d)
    if backend == "sageattention" and fast:
        out = _load("sageattention")(q, k, v, tensor_layout="NHD", is_causal=False)
        return out.reshape(b, lq, h * d)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, lq, h * d)
