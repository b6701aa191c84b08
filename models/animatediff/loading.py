"""Reading AnimateDiff motion-module files (SD1.5): version detection and clear errors for wrong files.

Versions (REFERENCE §6): v1 (mm_sd_v14/v15) no mid block, PE length 24; v2 (mm_sd_v15_v2) mid block, PE 32;
v3 (v3_sd15_mm) no mid block, PE 32. Files without any `pos_encoder` key are AnimateLCM-style (the
sinusoid is rebuilt, length 32). Files with `pos_encoder.positional_encoding` are HotShot-XL (SDXL).
"""
import os
import re

import torch

from .. import checkpoints
from ..checkpoints import CheckpointError
from . import motion_module as mm

DEFAULT_PE_LENGTH = 32
_MM_KEY = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.")
_PE_KEY = re.compile(r"\.pos_encoder\.pe$")


class MotionModuleFile:
    """A loaded motion module: the module set plus what was detected about it."""

    def __init__(self, modules, version, name):
        self.modules = modules
        self.version = version
        self.name = name

    @property
    def pe_length(self):
        return self.modules.pe_length

    @property
    def has_mid(self):
        return self.modules.has_mid

    def __repr__(self):
        return f"MotionModuleFile({self.name!r}, {self.version}, pe_length={self.pe_length}, mid={self.has_mid})"


def _what_else(state):
    """A sentence naming the kind of file `state` is when it is not an SD1.5 motion module, else None."""
    keys = list(state)
    if any("pos_encoder.positional_encoding" in k for k in keys):
        return (
            "an SDXL motion module (HotShot-XL layout, 'pos_encoder.positional_encoding'); the CVG AnimateDiff "
            "nodes animate SD1.5 models only — use an SD1.5 motion module (mm_sd_v15_v2, v3_sd15_mm)"
        )
    if any("_lora.down.weight" in k or "_lora.up.weight" in k for k in keys):
        if any(".motion_modules." in k for k in keys):
            return "a MotionLoRA, use CVG Load MotionLoRA (files in models/animatediff_motion_lora)"
        return (
            "an image-layer LoRA (for example the v3 domain adapter v3_sd15_adapter.ckpt); load it with the "
            "native LoraLoaderModelOnly from models/loras"
        )
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a Stable Diffusion checkpoint; load it with the native Load Checkpoint node (models/checkpoints)"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint; load it with the native Load Checkpoint node (models/checkpoints)"
    if any(".attentions." in k and ".transformer_blocks." in k for k in keys) and not any(
        ".motion_modules." in k for k in keys
    ):
        return "a diffusers UNet or image-model file, not a motion module"
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "an image LoRA; load it with the native LoraLoader (models/loras)"
    return None


def _strip_known_prefixes(state):
    for prefix in ("module.", "motion_module."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def inspect_state_dict(state, name="motion module"):
    """(version, has_mid, pe_length, has_pe, widths) of a motion-module state dict, or a CheckpointError."""
    other = _what_else(state)
    if other is not None:
        raise CheckpointError(f"{name!r} is not an AnimateDiff motion module: this is {other}")
    state = _strip_known_prefixes(state)
    mm_keys = [k for k in state if _MM_KEY.match(k)]
    if not mm_keys:
        sample = ", ".join(sorted(state)[:3])
        raise CheckpointError(
            f"{name!r} is not an AnimateDiff motion module: it has no 'down_blocks.N.motion_modules.M.' keys "
            f"(found e.g. {sample}); expected a file such as mm_sd_v15_v2.ckpt or v3_sd15_mm.ckpt"
        )
    has_mid = any(k.startswith("mid_block.motion_modules.") for k in mm_keys)
    pe = [state[k] for k in mm_keys if _PE_KEY.search(k)]
    has_pe = bool(pe)
    if has_pe:
        lengths = sorted({int(t.shape[1]) for t in pe if t.dim() == 3})
        if len(lengths) != 1:
            raise CheckpointError(f"{name!r} has positional encodings of different lengths {lengths}")
        pe_length = lengths[0]
    else:
        pe_length = DEFAULT_PE_LENGTH

    def width(prefix):
        key = f"{prefix}.motion_modules.0.temporal_transformer.proj_in.weight"
        if key not in state:
            raise CheckpointError(f"{name!r} is incomplete: {key!r} is missing (the file may be truncated)")
        return int(state[key].shape[0])

    down = tuple(width(f"down_blocks.{i}") for i in range(4))
    up = tuple(width(f"up_blocks.{i}") for i in range(4))
    mid = width("mid_block") if has_mid else mm.SD15_MID
    if (down, up) != (mm.SD15_DOWN, mm.SD15_UP):
        raise CheckpointError(
            f"{name!r} has motion modules of widths down {list(down)} / up {list(up)}; SD1.5 motion modules "
            f"have {list(mm.SD15_DOWN)} / {list(mm.SD15_UP)} (an SDXL module has 3 down blocks)"
        )
    if not has_pe:
        version = "AnimateLCM-style (no positional-encoding buffers)"
    elif has_mid and pe_length == 32:
        version = "v2"
    elif not has_mid and pe_length == 24:
        version = "v1"
    elif not has_mid and pe_length == 32:
        version = "v3"
    else:
        version = f"custom ({'mid block, ' if has_mid else ''}PE length {pe_length})"
    return version, has_mid, pe_length, has_pe, (down, up, mid)


def build_from_state_dict(state, name="motion module"):
    """A MotionModuleFile from a state dict; every key must match the detected layout exactly."""
    state = _strip_known_prefixes(state)
    version, has_mid, pe_length, has_pe, (down, up, mid) = inspect_state_dict(state, name)
    with torch.device("meta"):
        modules = mm.MotionModuleSet(down, up, mid, has_mid=has_mid, pe_length=pe_length, pe_persistent=has_pe)
    expected = {k: tuple(v.shape) for k, v in modules.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problem = checkpoints.describe_mismatch(expected, found, f"complete AnimateDiff {version} motion module")
    if problem:
        raise CheckpointError(f"{name!r} is {problem}; the file may be truncated or from another release")
    tensors = {}
    for k, v in state.items():
        if v.device.type == "meta":
            raise CheckpointError(f"{name!r}: tensor {k!r} has no data")
        tensors[k] = v.float() if v.dtype == torch.float64 else v
    modules.load_state_dict(tensors, strict=True, assign=True)
    if not has_pe:  # non-persistent buffers stay on meta after assign: rebuild the sinusoid
        for m in modules.modules():
            if isinstance(m, mm.PositionalEncoding):
                dim = m.pe.shape[-1]
                m.pe = mm.sinusoidal_encoding(pe_length, dim)
    modules.eval().requires_grad_(False)
    return MotionModuleFile(modules, version, name)


def load_motion_module(path):
    """Read a .safetensors / .ckpt (weights_only) motion-module file; nested 'state_dict' is unwrapped."""
    name = os.path.basename(os.fspath(path))
    state = checkpoints.read_state_dict(path)
    return build_from_state_dict(state, name)
