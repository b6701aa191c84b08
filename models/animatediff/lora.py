"""MotionLoRA: low-rank updates of the motion modules' attention projections.

File keys: `<module path>.attention_blocks.{0,1}.processor.to_{q,k,v,out}_lora.{down,up}.weight`, down [r, C],
up [C, r]; `to_out_lora` targets `to_out.0`. Applied as W + α·(up @ down), α the user strength, no rank
normalisation. The merge is computed into NEW tensors: the loaded motion module is never modified, so two
workflows can use it with different LoRAs.
"""
import os
import re

import torch

from .. import checkpoints
from ..checkpoints import CheckpointError
from . import motion_module as mm

LORA_KEY = re.compile(
    r"^(?P<module>.+)\.attention_blocks\.(?P<attn>[01])\.processor\."
    r"(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$"
)


class MotionLoRA:
    """Parsed MotionLoRA: {target parameter name: (down [r, C], up [C, r])}."""

    def __init__(self, pairs, name):
        self.pairs = pairs
        self.name = name

    @property
    def rank(self):
        return max(int(d.shape[0]) for d, _ in self.pairs.values())

    @property
    def has_mid(self):
        return any(k.startswith("mid_block.") for k in self.pairs)

    def __repr__(self):
        return f"MotionLoRA({self.name!r}, {len(self.pairs)} projections, rank {self.rank})"


def _target(match):
    proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
    return f"{match['module']}.attention_blocks.{match['attn']}.{proj}.weight"


def parse_motion_lora(state, name="MotionLoRA"):
    if not state:
        raise CheckpointError(f"{name!r} holds no tensors")
    halves, other = {}, []
    for k, v in state.items():
        m = LORA_KEY.match(k)
        if m is None or ".motion_modules." not in k:
            other.append(k)
            continue
        halves.setdefault(_target(m), {})[m["which"]] = v
    if not halves:
        if any(".motion_modules." in k and ".temporal_transformer." in k for k in state):
            what = "an AnimateDiff motion module; load it with CVG Load Motion Module (models/animatediff_models)"
        elif any("_lora." in k or "lora_" in k for k in state):
            what = (
                "a LoRA for the image layers (for example the v3 domain adapter v3_sd15_adapter.ckpt); "
                "load it with the native LoraLoaderModelOnly (models/loras)"
            )
        elif any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in state):
            what = "a Stable Diffusion checkpoint; load it with the native Load Checkpoint node"
        else:
            what = f"not a LoRA (found e.g. {sorted(state)[0]!r})"
        raise CheckpointError(
            f"{name!r} is not a MotionLoRA: it is {what}. A MotionLoRA has keys "
            "'…motion_modules.N….attention_blocks.{0,1}.processor.to_{q,k,v,out}_lora.{down,up}.weight'"
        )
    if other:
        raise CheckpointError(
            f"{name!r} mixes MotionLoRA keys with {len(other)} other tensors (e.g. {other[0]!r}); "
            "this is not a MotionLoRA file the loader understands"
        )
    pairs = {}
    for target, h in sorted(halves.items()):
        if set(h) != {"down", "up"}:
            missing = ({"down", "up"} - set(h)).pop()
            raise CheckpointError(f"{name!r} is incomplete: the {missing} half of the LoRA for {target!r} is missing")
        down, up = h["down"], h["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"{name!r}: LoRA for {target!r} has down {list(down.shape)} and up {list(up.shape)}; "
                "expected down [r, C] and up [C, r]"
            )
        pairs[target] = (down, up)
    return MotionLoRA(pairs, name)


def load_motion_lora(path):
    name = os.path.basename(os.fspath(path))
    return parse_motion_lora(checkpoints.read_state_dict(path), name)


def merged_weights(modules, loras):
    """{parameter name: W + Σ α·(up @ down)} for the parameters the LoRAs touch, as new tensors
    (computed in float32, returned in each weight's dtype). `loras` is a list of (MotionLoRA, α).
    Mid-block entries are skipped when `modules` has no mid block; any other unknown target is an error."""
    params = dict(modules.named_parameters())
    acc = {}
    for lora, alpha in loras:
        if alpha == 0:
            continue
        for target, (down, up) in lora.pairs.items():
            if target.startswith("mid_block.") and not modules.has_mid:
                continue
            if target not in params:
                raise CheckpointError(
                    f"MotionLoRA {lora.name!r} targets {target!r}, which this motion module does not have"
                )
            w = params[target]
            if tuple(w.shape) != (up.shape[0], down.shape[1]):
                raise CheckpointError(
                    f"MotionLoRA {lora.name!r} does not fit this motion module: {target!r} is "
                    f"{list(w.shape)} but the LoRA gives [{up.shape[0]}, {down.shape[1]}]"
                )
            delta = float(alpha) * (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32))
            acc[target] = acc[target] + delta if target in acc else w.detach().float() + delta
    return {k: v.to(params[k].dtype) for k, v in acc.items()}


def build_instance(modules, overrides=None, dtype=None):
    """A new MotionModuleSet with the same layout whose tensors are those of `modules` (shared, not copied,
    when the dtype already matches) except the parameters in `overrides`. `modules` is left untouched."""
    overrides = overrides or {}
    with torch.device("meta"):
        new = mm.MotionModuleSet(
            modules.down_widths, modules.up_widths, modules.mid_width,
            has_mid=modules.has_mid, pe_length=modules.pe_length,
        )
    state = {}
    for k, v in modules.state_dict(keep_vars=False).items():
        t = overrides.get(k, v)
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        state[k] = t
    # the meta model has persistent pe buffers; supply them from the source (persistent or not)
    src_pe = [m for m in modules.modules() if isinstance(m, mm.PositionalEncoding)]
    new_pe = [name for name, m in new.named_modules() if isinstance(m, mm.PositionalEncoding)]
    for name, m in zip(new_pe, src_pe):
        pe = m.pe if dtype is None else m.pe.to(dtype)
        state[f"{name}.pe"] = pe
    new.load_state_dict(state, strict=True, assign=True)
    return new.eval().requires_grad_(False)


def check_fits(modules, lora):
    """Raise CheckpointError unless every target of `lora` (mid-block ones aside for a mid-less module)
    is a parameter of `modules` with the LoRA's shape."""
    params = dict(modules.named_parameters())
    usable = 0
    for target, (down, up) in lora.pairs.items():
        if target.startswith("mid_block.") and not modules.has_mid:
            continue
        if target not in params:
            raise CheckpointError(f"MotionLoRA {lora.name!r} targets {target!r}, which this motion module does not have")
        if tuple(params[target].shape) != (up.shape[0], down.shape[1]):
            raise CheckpointError(
                f"MotionLoRA {lora.name!r} does not fit this motion module: {target!r} is "
                f"{list(params[target].shape)} but the LoRA gives [{up.shape[0]}, {down.shape[1]}]"
            )
        usable += 1
    if not usable:
        raise CheckpointError(f"MotionLoRA {lora.name!r} has no weights for this motion module's layers")
