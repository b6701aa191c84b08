"""Loading Wan2.1 VAE weights in every layout users have, with clear errors for anything else.

Layouts: the original `Wan2.1_VAE.pth` (pickle, read with weights_only=True), ComfyUI's repackaged
`wan_2.1_vae.safetensors` (same names), and diffusers `AutoencoderKLWan`
(`diffusion_pytorch_model.safetensors` [+ config.json]); any of them with a prefix such as `vae.` or
`first_stage_model.`; fp32/bf16/fp16 storage. The config is read from the tensor shapes, so tiny test
models load through the same path.
"""
import os
import re

import torch

from .. import checkpoints
from .vae import WanVAE, WanVAEConfig

PREFIXES = ("first_stage_model.", "vae.", "model.", "module.", "autoencoder.")

_RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
        "shortcut": "conv_shortcut"}
_RES_BACK = {v: k for k, v in _RES.items()}


# ---- key conversion (original <-> diffusers) ----------------------------------------------------------
def _res_inner(rest, table):
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _middle_to_diffusers(rest):
    m = re.match(r"middle\.(\d+)\.(.*)", rest)
    k, tail = int(m.group(1)), m.group(2)
    if k == 1:
        return f"mid_block.attentions.0.{tail}"
    return f"mid_block.resnets.{k // 2}.{_res_inner(tail, _RES)}"


def wan_to_diffusers(state, num_res_blocks):
    """Original names -> diffusers AutoencoderKLWan names."""
    out = {}
    s = num_res_blocks + 2
    for key, v in state.items():
        if key in ("conv1.weight", "conv1.bias"):
            new = "quant_conv." + key.split(".")[1]
        elif key in ("conv2.weight", "conv2.bias"):
            new = "post_quant_conv." + key.split(".")[1]
        else:
            part, rest = key.split(".", 1)
            if rest.startswith("conv1."):
                rest = "conv_in." + rest[len("conv1."):]
            elif rest.startswith("head.0."):
                rest = "norm_out." + rest[len("head.0."):]
            elif rest.startswith("head.2."):
                rest = "conv_out." + rest[len("head.2."):]
            elif rest.startswith("middle."):
                rest = _middle_to_diffusers(rest)
            elif rest.startswith("downsamples."):
                _, k, tail = rest.split(".", 2)
                rest = f"down_blocks.{k}.{_res_inner(tail, _RES)}"
            elif rest.startswith("upsamples."):
                _, k, tail = rest.split(".", 2)
                k = int(k)
                if k % s <= num_res_blocks:
                    rest = f"up_blocks.{k // s}.resnets.{k % s}.{_res_inner(tail, _RES)}"
                else:
                    rest = f"up_blocks.{k // s}.upsamplers.0.{tail}"
            new = f"{part}.{rest}"
        out[new] = v
    return out


def diffusers_to_wan(state, num_res_blocks=None):
    """diffusers AutoencoderKLWan names -> original names (num_res_blocks read from the keys if None)."""
    if num_res_blocks is None:
        idx = [int(m.group(1)) for k in state for m in [re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)] if m]
        if not idx:
            raise checkpoints.CheckpointError("diffusers Wan VAE without decoder.up_blocks.0.resnets.* tensors")
        num_res_blocks = max(idx)  # a stage holds num_res_blocks + 1 resnets
    s = num_res_blocks + 2
    out = {}
    for key, v in state.items():
        if key.startswith("quant_conv."):
            new = "conv1." + key[len("quant_conv."):]
        elif key.startswith("post_quant_conv."):
            new = "conv2." + key[len("post_quant_conv."):]
        else:
            part, rest = key.split(".", 1)
            if rest.startswith("conv_in."):
                rest = "conv1." + rest[len("conv_in."):]
            elif rest.startswith("norm_out."):
                rest = "head.0." + rest[len("norm_out."):]
            elif rest.startswith("conv_out."):
                rest = "head.2." + rest[len("conv_out."):]
            elif rest.startswith("mid_block.attentions.0."):
                rest = "middle.1." + rest[len("mid_block.attentions.0."):]
            elif rest.startswith("mid_block.resnets."):
                _, _, k, tail = rest.split(".", 3)
                rest = f"middle.{2 * int(k)}.{_res_inner(tail, _RES_BACK)}"
            elif rest.startswith("down_blocks."):
                _, k, tail = rest.split(".", 2)
                rest = f"downsamples.{k}.{_res_inner(tail, _RES_BACK)}"
            elif rest.startswith("up_blocks."):
                _, stage, kind, tail = rest.split(".", 3)
                stage = int(stage)
                if kind == "resnets":
                    j, tail = tail.split(".", 1)
                    rest = f"upsamples.{stage * s + int(j)}.{_res_inner(tail, _RES_BACK)}"
                elif kind == "upsamplers":
                    _, tail = tail.split(".", 1)
                    rest = f"upsamples.{stage * s + num_res_blocks + 1}.{tail}"
            new = f"{part}.{rest}"
        out[new] = v
    return out


# ---- recognising what a file holds ------------------------------------------------------------------
def _looks_like(keys):
    """A short description of a non-Wan-VAE state dict, or None."""
    ks = list(keys)

    def has(pattern):
        return any(re.search(pattern, k) for k in ks)

    if has(r"(^|\.)blocks\.\d+\.self_attn\.") or has(r"patch_embedding\.") or has(r"^model\.diffusion_model\."):
        return ("a diffusion model (Wan DiT-style 'blocks.N.self_attn' / 'patch_embedding' tensors); "
                "put it in models/diffusion_models and load it with the diffusion-model loader")
    if has(r"(input_blocks|middle_block|output_blocks)\.\d+") or has(r"transformer_blocks\.\d+\.attn1"):
        return "a UNet / image diffusion model, not a VAE"
    if has(r"encoder\.down\.\d+\.block\.") or has(r"encoder\.mid\.attn_1\.") or has(r"down_blocks\.\d+\.resnets\.\d+\.norm1\.weight"):
        return "an image VAE (SD/SDXL/Flux AutoencoderKL layout), not the Wan2.1 video VAE"
    if has(r"(^|\.)avg_shortcut\.") or has(r"decoder\.upsamples\.\d+\.upsamples\."):
        return "a Wan2.2 VAE (48 latent channels), which this Wan2.1 VAE loader does not support"
    if has(r"(^|\.)encoder\.block\.\d+\.layer\.") or has(r"^shared\.weight$"):
        return "a T5 text encoder"
    if has(r"vision_model\.") or has(r"^visual\."):
        return "a CLIP vision model"
    if has(r"motion_modules\.") or has(r"temporal_transformer\."):
        return "an AnimateDiff motion module"
    if has(r"lora_(up|down|A|B)\.") or has(r"\.lora\."):
        return "a LoRA"
    return None


def _select_vae_keys(state):
    """Strip a known prefix; in full checkpoints keep only the VAE's tensors."""
    for prefix in PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and (_is_wan_layout(sub) or _is_diffusers_layout(sub)):
            return sub
    return checkpoints.strip_prefix(state, PREFIXES)


def _is_wan_layout(state):
    return "encoder.conv1.weight" in state and "decoder.conv1.weight" in state


def _is_diffusers_layout(state):
    return "encoder.conv_in.weight" in state and "decoder.conv_in.weight" in state


def _to_wan_names(state, name):
    if _is_wan_layout(state):
        return state, "wan"
    if _is_diffusers_layout(state) and state["encoder.conv_in.weight"].ndim != 5:
        raise checkpoints.CheckpointError(
            f"{name} is not a Wan2.1 VAE: it looks like an image VAE (SD/SDXL/Flux AutoencoderKL, 2-D convs: "
            f"'encoder.conv_in.weight' has shape {list(state['encoder.conv_in.weight'].shape)}, the Wan VAE's is "
            "5-D). Pick the Wan2.1 VAE file (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)."
        )
    if _is_diffusers_layout(state) and any(k.startswith("decoder.up_blocks.") for k in state):
        try:
            return diffusers_to_wan(state), "diffusers"
        except (ValueError, IndexError) as e:
            raise checkpoints.CheckpointError(f"{name}: diffusers-style VAE keys could not be mapped ({e})") from e
    what = _looks_like(state)
    sample = ", ".join(repr(k) for k in sorted(state)[:3])
    found = f"it looks like {what}" if what else f"its {len(state)} tensors are named e.g. {sample}"
    raise checkpoints.CheckpointError(
        f"{name} is not a Wan2.1 VAE: expected tensors such as 'encoder.conv1.weight', 'decoder.conv1.weight', "
        f"'conv1.weight' (original / ComfyUI layout) or 'encoder.conv_in.weight' (diffusers layout), but {found}. "
        "Pick the Wan2.1 VAE file (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)."
    )


def infer_config(state, name="checkpoint"):
    """WanVAEConfig from the shapes of an original-layout state dict."""
    def shape(k):
        if k not in state:
            raise checkpoints.CheckpointError(f"{name} is not a complete Wan2.1 VAE: tensor {k!r} is missing")
        return tuple(state[k].shape)

    dim = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    items = {}
    for k in state:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(residual|resample|time_conv|shortcut)", k)
        if m:
            items.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not items or sorted(items) != list(range(len(items))):
        raise checkpoints.CheckpointError(f"{name}: encoder.downsamples.* tensors are missing or not numbered 0..N")
    stages, current, num_res, flags = [], 0, None, []
    for i in range(len(items)):
        if "resample" in items[i]:
            if num_res is None:
                num_res = current
            stages.append(shape(f"encoder.downsamples.{i - 1}.residual.6.weight")[0] // dim)
            flags.append("time_conv" in items[i])
            current = 0
        else:
            current += 1
    if num_res is None:
        num_res = current
    last = len(items) - 1
    stages.append(shape(f"encoder.downsamples.{last}.residual.6.weight")[0] // dim)
    if num_res < 1 or current != num_res:
        raise checkpoints.CheckpointError(f"{name}: encoder stages hold differing numbers of residual blocks")
    try:
        return WanVAEConfig(dim=dim, z_dim=z_dim, dim_mult=stages, num_res_blocks=num_res, temperal_downsample=flags)
    except ValueError as e:
        raise checkpoints.CheckpointError(f"{name}: unsupported Wan VAE configuration ({e})") from e


def expected_shapes(config):
    """{name: shape} of a WanVAE with `config`, built on the meta device."""
    with torch.device("meta"):
        model = WanVAE(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def wan_vae_from_state_dict(state, dtype=None, device="cpu", name="checkpoint", config=None):
    """A WanVAE (eval, no grad) from a state dict in any supported layout.

    dtype None keeps the storage dtype (fp32/bf16/fp16); otherwise tensors are cast to `dtype`.
    """
    if not isinstance(state, dict) or not state:
        raise checkpoints.CheckpointError(f"{name} holds no tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise checkpoints.CheckpointError(f"{name}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    state = _select_vae_keys(state)
    state, _layout = _to_wan_names(state, name)
    conv_in = state.get("encoder.conv1.weight")
    if any(".avg_shortcut." in k for k in state) or (conv_in is not None and conv_in.ndim == 5 and conv_in.shape[1] != 3):
        raise checkpoints.CheckpointError(
            f"{name} looks like a Wan2.2 VAE (patchified {list(conv_in.shape) if conv_in is not None else '?'} "
            "input conv / residual down-blocks, 48 latent channels), which is not the Wan2.1 VAE this loader "
            "reads. Pick wan_2.1_vae.safetensors (Wan2.1 and Wan2.2-14B models use it)."
        )
    if config is None:
        config = infer_config(state, name)
    expected = expected_shapes(config)
    found = {k: tuple(v.shape) for k, v in state.items()}
    mismatch = checkpoints.describe_mismatch(expected, found, "Wan2.1 VAE")
    if mismatch:
        raise checkpoints.CheckpointError(f"{name} is {mismatch}. Pick the Wan2.1 VAE file (wan_2.1_vae.safetensors).")
    floating = {v.dtype for v in state.values()}
    if any(not dt.is_floating_point for dt in floating):
        raise checkpoints.CheckpointError(f"{name}: the VAE tensors must be floating point, found {sorted(map(str, floating))}")
    if dtype is None:
        dtype = state["conv2.weight"].dtype
    with torch.device("meta"):
        model = WanVAE(config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_wan_vae(path, dtype=None, device="cpu"):
    """Read a Wan2.1 VAE from a file or diffusers folder; errors are CheckpointError with a hint."""
    path = os.fspath(path)
    name = repr(os.path.basename(path.rstrip("/")) or path)
    state = checkpoints.read_state_dict(path, device="cpu")
    model = wan_vae_from_state_dict(state, dtype=dtype, device=device, name=name)
    cfg = checkpoints.read_config(path) if os.path.isdir(path) else None
    if cfg and "z_dim" in cfg and int(cfg["z_dim"]) != model.z_dim:
        raise checkpoints.CheckpointError(
            f"{name}: config.json says z_dim={cfg['z_dim']} but the weights have {model.z_dim} latent channels")
    return model


def save_wan_vae(model, path, layout="wan", dtype=None):
    """Write a WanVAE's weights as safetensors (layout "wan" or "diffusers", used by tests/tools)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        state = wan_to_diffusers(state, model.config.num_res_blocks)
    save_file(state, os.fspath(path))
