"""AnimateDiff motion modules (temporal transformers) and their insertion into an SD1.5 UNet.

Plain PyTorch. The parameter names follow the released AnimateDiff files exactly
(`down_blocks.0.motion_modules.0.temporal_transformer.…`, see the manifests), so a released state dict
loads with `load_state_dict(strict=True)`.

One motion module, for a feature map of C channels and F frames (batch = batch·F):
  GroupNorm(32, C, eps 1e-6) on each frame separately → tokens over frames per spatial location
  → proj_in → one transformer block → proj_out → + residual.
The block runs two temporal self-attention layers (8 heads, a sinusoidal positional encoding added to the
normed input before q/k/v) and a GEGLU feed-forward (exact GELU), each pre-normed and residual.

Every layer casts its weights to the input's device and dtype when they differ, so the modules work when
a memory manager leaves them on another device than the UNet's activations (low-VRAM loading) or keeps
them in a different dtype.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = 8
SD15_DOWN = (320, 640, 1280, 1280)
SD15_MID = 1280
SD15_UP = (1280, 1280, 640, 320)
DOWN_PER_BLOCK = 2
UP_PER_BLOCK = 3


def _match(t, x):
    if t is None:
        return None
    if t.device != x.device or t.dtype != x.dtype:
        return t.to(device=x.device, dtype=x.dtype)
    return t


class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, _match(self.weight, x), _match(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, _match(self.weight, x), _match(self.bias, x), self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, _match(self.weight, x), _match(self.bias, x), self.eps)


def sinusoidal_encoding(length, dim):
    """pe[pos, 0::2] = sin(pos·div), pe[pos, 1::2] = cos(pos·div), div = exp(arange(0, dim, 2)·(−ln 10000 / dim));
    shape [1, length, dim], float32."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim, length=32, persistent=True):
        super().__init__()
        self.register_buffer("pe", sinusoidal_encoding(length, dim), persistent=persistent)

    @property
    def length(self):
        return self.pe.shape[1]

    def forward(self, x):
        frames = x.shape[1]
        if frames > self.length:
            raise ValueError(
                f"{frames} frames at once exceed the motion module's positional encoding length "
                f"{self.length}; use context windows of at most {self.length} frames"
            )
        return x + _match(self.pe[:, :frames], x)


class TemporalAttention(nn.Module):
    """Self-attention over frames; x is [N, F, C] with N = batch · spatial locations."""

    def __init__(self, dim, pe_length=32, pe_persistent=True, heads=HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"motion module width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(dim, dim, bias=False)
        self.to_v = Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        self.pos_encoder = PositionalEncoding(dim, pe_length, pe_persistent)

    def forward(self, x):
        x = self.pos_encoder(x)
        n, f, c = x.shape
        q, k, v = (
            proj(x).reshape(n, f, self.heads, c // self.heads).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(n, f, c))


class GEGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = Linear(dim, hidden * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is the (inference-time no-op) dropout of the reference; it has no weights.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim, pe_length=32, pe_persistent=True):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, pe_length, pe_persistent) for _ in range(2)]
        )
        self.norms = nn.ModuleList([LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim)
        self.ff_norm = LayerNorm(dim)

    def forward(self, x):
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, dim, pe_length=32, pe_persistent=True):
        super().__init__()
        self.norm = GroupNorm(32, dim, eps=1e-6)
        self.proj_in = Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(dim, pe_length, pe_persistent)])
        self.proj_out = Linear(dim, dim)

    def delta(self, x, frames):
        """The module's contribution (output minus input) for x [batch·frames, C, H, W]."""
        bf, c, h, w = x.shape
        if bf % frames:
            raise ValueError(f"a batch of {bf} feature maps is not a whole number of {frames}-frame clips")
        b = bf // frames
        t = self.norm(x)  # per frame: each (b·f) sample is normalised on its own
        t = t.reshape(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        return t.reshape(b, h * w, frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)

    def forward(self, x, frames):
        return x + self.delta(x, frames)


class MotionModule(nn.Module):
    def __init__(self, dim, pe_length=32, pe_persistent=True):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(dim, pe_length, pe_persistent)

    @property
    def dim(self):
        return self.temporal_transformer.proj_in.in_features

    def forward(self, x, frames):
        return self.temporal_transformer(x, frames)


class _Block(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.motion_modules = nn.ModuleList(modules)


class MotionModuleSet(nn.Module):
    """All motion modules of an AnimateDiff file: down_blocks.{0..3} (2 each), mid_block (v2 only),
    up_blocks.{0..3} (3 each), at any widths (SD1.5 defaults)."""

    def __init__(self, down=SD15_DOWN, up=SD15_UP, mid=SD15_MID, has_mid=False, pe_length=32, pe_persistent=True):
        super().__init__()
        make = lambda c: MotionModule(c, pe_length, pe_persistent)  # noqa: E731
        self.down_blocks = nn.ModuleList([_Block([make(c) for _ in range(DOWN_PER_BLOCK)]) for c in down])
        self.mid_block = _Block([make(mid)]) if has_mid else None
        self.up_blocks = nn.ModuleList([_Block([make(c) for _ in range(UP_PER_BLOCK)]) for c in up])
        self.down_widths = tuple(down)
        self.up_widths = tuple(up)
        self.mid_width = mid
        self.has_mid = has_mid
        self.pe_length = pe_length

    def named_motion_modules(self):
        """(name, module) for every motion module, e.g. ('down_blocks.0.motion_modules.1', m)."""
        for i, block in enumerate(self.down_blocks):
            for j, m in enumerate(block.motion_modules):
                yield f"down_blocks.{i}.motion_modules.{j}", m
        if self.mid_block is not None:
            yield "mid_block.motion_modules.0", self.mid_block.motion_modules[0]
        for i, block in enumerate(self.up_blocks):
            for j, m in enumerate(block.motion_modules):
                yield f"up_blocks.{i}.motion_modules.{j}", m


# ---------------------------------------------------------------------------------------------------
# Insertion into a UNet with the LDM / ComfyUI block layout (input_blocks, middle_block, output_blocks).


def sd15_insertion_points(has_mid):
    """[(motion module name, UNet block path)] for the SD1.5 layout.

    input_blocks 1,2 / 4,5 / 7,8 / 10,11 hold the (resnet, attention) pairs of the down blocks (0, 3, 6, 9 are
    conv_in and the downsamplers); output_blocks 3k..3k+2 form up block k; the mid-block module sits between
    the middle block's attention and its second resnet."""
    points = []
    for i in range(4):
        for j in range(DOWN_PER_BLOCK):
            points.append((f"down_blocks.{i}.motion_modules.{j}", f"input_blocks.{3 * i + 1 + j}"))
    if has_mid:
        points.append(("mid_block.motion_modules.0", "middle_block"))
    for i in range(4):
        for j in range(UP_PER_BLOCK):
            points.append((f"up_blocks.{i}.motion_modules.{j}", f"output_blocks.{3 * i + j}"))
    return points


class FrameState:
    """How many frames the current UNet call holds; set by whoever calls the UNet (see context.py)."""

    def __init__(self):
        self.frames = None


class MotionLayer(nn.Module):
    """A motion module placed inside a UNet block; it is called with the feature map only and reads the
    number of frames from a shared FrameState. `scale` multiplies the module's contribution."""

    def __init__(self, module, state, scale=1.0):
        super().__init__()
        self.module = module
        self.state = state
        self.scale = float(scale)

    def forward(self, x):
        frames = self.state.frames
        if frames is None:
            raise RuntimeError(
                "the motion module was called without a frame count: the UNet was run without the "
                "AnimateDiff model wrapper (another node may have replaced the model function wrapper)"
            )
        if self.scale == 0.0:
            return x
        delta = self.module.temporal_transformer.delta(x, frames)
        return x + delta if self.scale == 1.0 else x + self.scale * delta


def _is_upsample(layer):
    return type(layer).__name__ == "Upsample"


def _channels(block):
    """Output channels of a UNet block: those of its last layer that reports out_channels."""
    out = None
    for layer in block:
        if _is_upsample(layer):
            break
        c = getattr(layer, "out_channels", None)
        if c is None:
            c = getattr(layer, "in_channels", None)  # spatial transformers keep the width
        if isinstance(c, int):
            out = c
    return out


def _get(unet, path):
    obj = unet
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def check_layout(unet, modules):
    """Raise ValueError unless `unet` has the SD1.5 block layout with the widths `modules` was built for."""
    for name in ("input_blocks", "middle_block", "output_blocks"):
        if not hasattr(unet, name):
            raise ValueError(
                f"the MODEL's diffusion model ({type(unet).__name__}) has no {name}; AnimateDiff SD1.5 motion "
                "modules need an SD1.5 UNet"
            )
    n_in, n_out, n_mid = len(unet.input_blocks), len(unet.output_blocks), len(unet.middle_block)
    if (n_in, n_out, n_mid) != (12, 12, 3):
        raise ValueError(
            f"the MODEL's UNet has {n_in} input / {n_out} output blocks and a {n_mid}-layer middle block; "
            "AnimateDiff SD1.5 motion modules need the SD1.5 layout (12 / 12 / 3) — use an SD1.5 checkpoint"
        )
    for name, path in sd15_insertion_points(modules.has_mid):
        want = _get(modules, name).dim
        found = _channels(_get(unet, path))
        if found != want:
            raise ValueError(
                f"the UNet block {path} has {found} channels but motion module {name} expects {want}; "
                "AnimateDiff SD1.5 motion modules need an SD1.5 UNet"
            )


def block_patches(unet, modules, state, scale=1.0):
    """{UNet block path: replacement block} with each motion module placed after the right layers.

    A replacement is a new container of the block's own class holding the SAME layer objects (no weight is
    copied) plus a MotionLayer child named 'motion'. The original children keep their names, so weight
    keys such as `output_blocks.5.2.conv.weight` still resolve to the original layers. The UNet itself
    is not modified; apply the replacements as object patches."""
    check_layout(unet, modules)
    out = {}
    for name, path in sd15_insertion_points(modules.has_mid):
        block = _get(unet, path)
        layer = MotionLayer(_get(modules, name), state, scale)
        children = list(block.named_children())
        if path == "middle_block":
            at = 2  # between the attention and the second resnet
        else:
            at = next((i for i, (_, m) in enumerate(children) if _is_upsample(m)), len(children))
        items = children[:at] + [("motion", layer)] + children[at:]
        out[path] = type(block)(OrderedDict(items))
    return out


def zero_proj_out_(modules):
    """Zero every proj_out (the reference initialisation: each module starts as the identity)."""
    with torch.no_grad():
        for m in modules.modules():
            if isinstance(m, TemporalTransformer):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
    return modules


def training_betas(schedule="linear", steps=1000, start=0.00085, end=0.012):
    """β schedules by their diffusers names (float64): 'linear' = linspace(start, end) — what AnimateDiff
    trained with, called `sqrt_linear` in ComfyUI/LDM; 'scaled_linear' = linspace(√start, √end)² — SD1.5's
    default, called `linear` in ComfyUI/LDM."""
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'linear' or 'scaled_linear'")
