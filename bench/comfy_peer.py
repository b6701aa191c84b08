"""ComfyUI's own Wan DiT and Wan VAE as benchmark peers, built from a ComfyUI tree with this pack's weights.

Only the bench scripts import this (models/ never imports ComfyUI). ComfyUI is configured, not patched: its
command-line namespace `comfy.cli_args.args` is parsed from an empty argv (comfy.options.args_parsing stays
off, so our own flags never reach its parser) and gets `cpu = True` on a CPU run — the same as `main.py --cpu`
— before `comfy.model_management` is first imported, because that module picks its device at import time.

Third-party modules the imported ComfyUI code needs beyond torch + numpy: einops, psutil, Pillow (imported by
comfy.ldm.util), tqdm (already a transformers dependency), and optionally comfy_kitchen (its CUDA RoPE
kernel; without it ComfyUI falls back to its PyTorch RoPE and logs a warning).
"""
import importlib
import os
import sys

import torch

NEEDED = ("comfy/ldm/wan/model.py", "comfy/ldm/wan/vae.py", "comfy/ops.py", "comfy/model_management.py")


def import_comfy(path, device):
    """Import ComfyUI's Wan modules from the tree at `path`, configured for `device`; returns a namespace."""
    path = os.path.abspath(path)
    missing = [p for p in NEEDED if not os.path.isfile(os.path.join(path, p))]
    if missing:
        raise FileNotFoundError(f"--comfyui {path}: expected a ComfyUI tree with {', '.join(NEEDED)}; "
                                f"missing {', '.join(missing)}. Pass the folder that holds ComfyUI's main.py.")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args
    if not os.path.abspath(comfy.cli_args.__file__).startswith(path + os.sep):
        raise ImportError(f"--comfyui {path}: `comfy` was already imported from {comfy.cli_args.__file__}; "
                          f"run without that ComfyUI on sys.path / PYTHONPATH")
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = torch.device(device).type == "cpu"
    try:
        modules = {n: importlib.import_module(n) for n in
                   ("comfy.model_management", "comfy.ops", "comfy.ldm.wan.model", "comfy.ldm.wan.vae",
                    "comfy.ldm.modules.attention", "comfy.quant_ops")}
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"ComfyUI at {path} needs the module {e.name!r}, not installed here; install "
                                  f"it (pip install {e.name}) or carry its wheel (see bench/comfy_peer.py)") from e
    return type("Comfy", (), {"path": path, **{n.rsplit(".", 1)[-1]: m for n, m in modules.items()}})


def describe(comfy):
    """One line: ComfyUI version, its attention function and whether comfy_kitchen's CUDA kernels loaded."""
    try:
        version = importlib.import_module("comfyui_version").__version__
    except ImportError:
        version = "unknown"
    kitchen = "not installed (PyTorch RoPE)"
    if comfy.quant_ops._CK_AVAILABLE:
        backends = comfy.quant_ops.ck.list_backends()
        kitchen = ", ".join(f"{k} {'on' if v['available'] and not v['disabled'] else 'off'}"
                            for k, v in backends.items())
    return (f"ComfyUI {version} at {comfy.path}: attention {comfy.attention.optimized_attention.__name__}, "
            f"comfy_kitchen {kitchen}")


def load_exact(module, state, what):
    """load_state_dict that names every key either side lacks (strict loading, clearer message)."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{what}: ComfyUI's keys differ from ours: missing {result.missing_keys[:8]}, "
                           f"unexpected {result.unexpected_keys[:8]}")
    return module


def wan_dit(comfy, ours, cfg, device, dtype):
    """ComfyUI's WanModel with `ours`' weights, in `dtype` on `device`, as ComfyUI builds it for bf16 weights
    (operations = comfy.ops.disable_weight_init: no per-call weight casts)."""
    kw = dict(model_type=cfg.model_type, patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
              dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
              num_heads=cfg.heads, num_layers=cfg.layers, qk_norm=True, cross_attn_norm=True, eps=cfg.eps,
              device="meta", dtype=dtype, operations=comfy.ops.disable_weight_init)
    if cfg.has_image and cfg.image_dim != 1280:
        raise ValueError(f"ComfyUI's WanModel has a fixed 1280-wide image embedding; this config has {cfg.image_dim}")
    model = comfy.model.WanModel(**kw).to_empty(device=device)
    state = ours.state_dict()
    return load_exact(model, state, "WanModel").eval().requires_grad_(False)


def dit_forward(model, x, t, ctx, clip=None, y=None, dtype=torch.bfloat16):
    """One ComfyUI WanModel forward the way its model_base calls it: the I2V condition concatenated on the
    channels, everything in the model dtype, a float timestep."""
    xin = torch.cat([x, y], 1) if y is not None else x
    kw = {"clip_fea": clip} if clip is not None else {}
    return model(xin.to(dtype), t.float(), ctx, **kw)


def wan_vae(comfy, state, cfg, device, dtype):
    """ComfyUI's Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE) with our state dict, as comfy/sd.py's VAE wrapper
    builds it (attn_scales [], dropout 0) and casts it (`.to(vae_dtype)`, no channels-last)."""
    model = comfy.vae.WanVAE(dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=list(cfg["dim_mult"]),
                             num_res_blocks=cfg["num_res_blocks"], attn_scales=[],
                             temperal_downsample=list(cfg["temperal_downsample"]), dropout=0.0)
    load_exact(model, state, "WanVAE")
    return model.to(device, dtype).eval().requires_grad_(False)
