"""Wan2.1 causal 3D VAE (plain PyTorch), written from the facts in REFERENCE.md §4.

Layout and parameter names follow the released `Wan2.1_VAE.pth` / `wan_2.1_vae.safetensors` files
(`encoder.*`, `conv1`, `conv2`, `decoder.*`), so those load without renaming; see `vae_loading.py` for
the diffusers layout and file handling.

Time is processed causally in chunks with a feature cache carried from chunk to chunk: the encoder
sees 1, 4, 4, … frames, the decoder one latent frame at a time. Every causal convolution keeps the last
CACHE_T = 2 frames of its input in a per-stream state dict (keyed by the module), so a stream can be
fed in any pieces and gives exactly the same result as the whole clip: `encode`/`decode` themselves are
thin loops over the streams. Separate streams (e.g. spatial tiles) each own their state.

Memory: the stages that are local in time (encoder: before the first temporal downsample; decoder:
after the last temporal upsample) run depth-first one frame at a time, so full-resolution activations
exist for one frame only; the carried caches (CACHE_T frames per conv) are the bulk of the memory and
do not grow with the clip length. On CUDA `set_channels_last()` keeps activations NDHWC (faster
cuDNN conv3d, fused RMS norm).

Values: video in -1..1 [B,3,T,H,W]; latents in RAW VAE space (mu before normalisation) [B,z,t,h,w],
the convention of ComfyUI's native Wan latents; `latent.normalize` maps raw -> DiT space.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import latent as latent_space

CACHE_T = 2
ENCODE_CHUNK = 4  # frames per encoder chunk after the first single frame

# Residual blocks and heads split their chunk along time so one piece holds at most this many
# elements: memory then stays flat at high resolution. Causal convs with a carried cache are exact
# under any split, and the split depends only on the shape, so the whole clip and any streaming of it
# run the very same operations.
DEFAULT_MAX_PIECE_ELEMS = 1 << 25

# On CUDA with channels-last activations, RMS_norm uses the fused F.rms_norm kernel.
FAST_RMS_NORM = True


def _roll(prev, x):
    """The cache a causal conv keeps after seeing `x`: the last CACHE_T frames of prev ++ x."""
    n = x.shape[2]
    if n >= CACHE_T or prev is None:
        return x[:, :, -CACHE_T:].clone()
    keep = CACHE_T - n
    if isinstance(prev, _ZeroFrames):
        head = torch.zeros_like(x[:, :, :1]).expand(-1, -1, keep, -1, -1)
    else:
        head = prev[:, :, -keep:]
    return torch.cat([head, x], 2)


class _ZeroFrames:
    """Marker: an upsample3d time conv whose past counts as zero frames (after the first chunk)."""


_ZERO = _ZeroFrames()


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding lies entirely in front (2·p_t frames), none behind.

    `cache` (the previous frames of this conv's input) is prepended and the zero front padding shrinks
    by its length. Spatial padding is ordinary symmetric zero padding.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x, cache=None):
        if self.time_pad:
            parts = []
            have = 0 if cache is None else cache.shape[2]
            zeros = self.time_pad - have
            if zeros > 0:
                parts.extend([torch.zeros_like(x[:, :, :1])] * zeros)
            if cache is not None:
                parts.append(cache.to(x.device, x.dtype))
            if parts:
                x = torch.cat(parts + [x], 2)
        return super().forward(x)


def cached_conv(conv, x, state):
    """Run a causal conv on one chunk and carry its cache in `state`.

    The conv's padded input is [zero frames | cached frames | x]; its last CACHE_T frames are the new
    cache (a zero frame stands in for front padding, which the next call would add anyway). The old
    cache is released before the new one is taken, so only one of them is alive at a time.
    """
    if not conv.time_pad:
        return conv(x)
    prev = state.pop(conv, None)
    parts = []
    have = 0 if prev is None else prev.shape[2]
    if conv.time_pad > have:
        parts.extend([torch.zeros_like(x[:, :, :1])] * (conv.time_pad - have))
    if prev is not None:
        parts.append(prev.to(x.device, x.dtype))
    parts.append(x)
    xin = torch.cat(parts, 2)
    del parts, prev
    state[conv] = xin[:, :, -CACHE_T:].clone()
    return nn.Conv3d.forward(conv, xin)


class RMS_norm(nn.Module):
    """F.normalize over channels · √C · gamma (the released files have no bias)."""

    def __init__(self, dim, images=True):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        if (FAST_RMS_NORM and x.is_cuda and x.ndim == 5 and x.dtype in (torch.float16, torch.bfloat16)
                and x.is_contiguous(memory_format=torch.channels_last_3d) and hasattr(F, "rms_norm")):
            # Channels are innermost in memory: one fused pass (fp32 statistics inside the kernel).
            # rms_norm(x) = normalize(x) * sqrt(C), up to the eps placement.
            y = F.rms_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.gamma.reshape(-1).to(x.dtype), 1e-12)
            return y.permute(0, 4, 1, 2, 3)
        if x.dtype in (torch.float16, torch.bfloat16):
            # Norm accumulated in fp32 without an fp32 copy of the activation.
            n = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
            inv = (self.scale / n.clamp_min(1e-12)).to(x.dtype)
            if torch.is_grad_enabled():  # training (bf16 autocast): autograd needs x·inv for gamma's gradient
                return (x * inv * self.gamma).to(x.dtype)
            return (x * inv).mul_(self.gamma)
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


def _frames_to_batch(x):
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), b, t


def _batch_to_frames(x, b, t):
    bt, c, h, w = x.shape
    return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.max_piece_elems = DEFAULT_MAX_PIECE_ELEMS

    def _piece(self, x, state):
        h = self.shortcut(x)
        r = self.residual
        y = F.silu(r[0](x), inplace=True)
        y = cached_conv(r[2], y, state)
        y = r[5](F.silu(r[3](y), inplace=True))
        y = cached_conv(r[6], y, state)
        return y.add_(h)

    def forward(self, x, state):
        return _split_time(self._piece, x, state, self.out_dim, self.max_piece_elems)


def _split_time(fn, x, state, out_channels, max_elems):
    b, c, t, h, w = x.shape
    per = max(1, max_elems // max(1, max(c, out_channels) * h * w * b))
    if t <= per:
        return fn(x, state)
    out = None
    for s in range(0, t, per):
        y = fn(x[:, :, s:s + per], state)
        if out is None:
            out = torch.empty((b, y.shape[1], t) + tuple(y.shape[3:]), dtype=y.dtype, device=y.device)
            if y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous():
                out = out.contiguous(memory_format=torch.channels_last_3d)
        out[:, :, s:s + y.shape[2]] = y
        del y
    return out


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h·w tokens of each frame separately."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        identity = x
        y, b, t = _frames_to_batch(x)
        bt, c, h, w = y.shape
        qkv = self.to_qkv(self.norm(y)).reshape(bt, 1, c * 3, h * w).permute(0, 1, 3, 2)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        del qkv
        y = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        y = y.squeeze(1).permute(0, 2, 1).reshape(bt, c, h, w)
        y = self.proj(y)
        return _batch_to_frames(y, b, t) + identity


class _Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """downsample2d/3d and upsample2d/3d of the Wan VAE (names match the released files)."""

    def __init__(self, dim, mode):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_Upsample(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.max_piece_elems = DEFAULT_MAX_PIECE_ELEMS

    def _spatial(self, x):
        b, c, t, h, w = x.shape
        grow = 4 if self.mode.startswith("up") else 1
        per = max(1, self.max_piece_elems // max(1, c * h * w * grow))
        y, b, t = _frames_to_batch(x)
        if y.shape[0] <= per:
            return _batch_to_frames(self.resample(y), b, t)
        outs = [self.resample(y[s:s + per]) for s in range(0, y.shape[0], per)]
        return _batch_to_frames(torch.cat(outs, 0), b, t)

    def forward(self, x, state):
        if self.mode == "upsample3d":
            prev = state.get(self)
            if prev is None:
                # First chunk: no time conv, one frame stays one; afterwards the past counts as zeros.
                state[self] = _ZERO
            else:
                state[self] = _roll(prev, x)
                y = self.time_conv(x, None if prev is _ZERO else prev)
                b, c2, t, h, w = y.shape
                c = c2 // 2
                x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)
                del y
        x = self._spatial(x)
        if self.mode == "downsample3d":
            prev = state.get(self)
            state[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


class _Head(nn.Sequential):
    """RMS_norm → SiLU → CausalConv3d(3), split along time like the residual blocks."""

    def __init__(self, dim, out_dim):
        super().__init__(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))
        self.max_piece_elems = DEFAULT_MAX_PIECE_ELEMS

    def _piece(self, x, state):
        return cached_conv(self[2], F.silu(self[0](x), inplace=True), state)

    def forward(self, x, state):
        return _split_time(self._piece, x, state, self[0].gamma.shape[0], self.max_piece_elems)


def _per_frame(fn, x):
    """fn applied to each frame of x in order (fn carries its causal caches), outputs stacked in time."""
    t = x.shape[2]
    if t == 1:
        return fn(x)
    out = None
    for f in range(t):
        y = fn(x[:, :, f:f + 1])
        if out is None:
            out = torch.empty((y.shape[0], y.shape[1], t * y.shape[2]) + tuple(y.shape[3:]), dtype=y.dtype,
                              device=y.device)
            if y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous():
                out = out.contiguous(memory_format=torch.channels_last_3d)
        n = y.shape[2]
        out[:, :, f * n:(f + 1) * n] = y
        del y
    return out


def _run_middle(middle, x, state):
    x = middle[0](x, state)
    x = middle[1](x)
    return middle[2](x, state)


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_downsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1], dropout), AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1], dropout),
        )
        self.head = _Head(dims[-1], z_dim)

        # Everything before the first temporal downsample is local in time (causal convs with a cache):
        # it runs depth-first, one frame at a time, so full-resolution activations exist for one frame.
        self.local_until = next((i for i, m in enumerate(self.downsamples)
                                 if isinstance(m, Resample) and m.mode == "downsample3d"), len(self.downsamples))

    def forward(self, x, state):
        k = self.local_until

        def local(y):
            y = cached_conv(self.conv1, y, state)
            for layer in self.downsamples[:k]:
                y = layer(y, state)
            return y

        x = _per_frame(local, x)
        for layer in self.downsamples[k:]:
            x = layer(x, state)
        x = _run_middle(self.middle, x, state)
        return self.head(x, state)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], dropout),
        )
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsample halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _Head(dims[-1], 3)

        # After the last temporal upsample everything is local in time: run it depth-first per frame.
        ups = [i for i, m in enumerate(self.upsamples) if isinstance(m, Resample) and m.mode == "upsample3d"]
        self.local_from = ups[-1] + 1 if ups else 0

    def forward(self, x, state):
        x = cached_conv(self.conv1, x, state)
        x = _run_middle(self.middle, x, state)
        k = self.local_from
        for layer in self.upsamples[:k]:
            x = layer(x, state)

        def local(y):
            for layer in self.upsamples[k:]:
                y = layer(y, state)
            return self.head(y, state)

        return _per_frame(local, x)


@dataclass
class WanVAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0

    def __post_init__(self):
        self.dim_mult = [int(m) for m in self.dim_mult]
        self.temperal_downsample = [bool(f) for f in self.temperal_downsample]
        if len(self.dim_mult) < 1 or len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"Wan VAE config: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"flags, got {len(self.temperal_downsample)}"
            )
        if ENCODE_CHUNK % (2 ** sum(self.temperal_downsample)):
            raise ValueError(
                f"Wan VAE config: at most 2 temporal downsamples are supported (chunks of {ENCODE_CHUNK} "
                f"frames), got {sum(self.temperal_downsample)}"
            )

    def to_dict(self):
        return asdict(self)


class WanVAE(nn.Module):
    """The Wan2.1 VAE: `encoder`, `conv1` (1×1×1 on 2·z), `conv2` (1×1×1 on z), `decoder`."""

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is None:
            config = WanVAEConfig(**kwargs)
        elif isinstance(config, dict):
            config = WanVAEConfig(**{**config, **kwargs})
        self.config = config
        c = config
        self.z_dim = c.z_dim
        self.temporal_stride = 2 ** sum(c.temperal_downsample)
        self.spatial_stride = 2 ** (len(c.dim_mult) - 1)
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.temperal_downsample, c.dropout)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(
            c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.temperal_downsample[::-1], c.dropout
        )
        self.memory_format = torch.contiguous_format

    # ---- properties -------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.conv2.weight.dtype

    @property
    def device(self):
        """Where the weights are. Current ComfyUI's ModelPatcher assigns `.device` after moving a model;
        the setter keeps that as a note only, so the property can never disagree with the weights."""
        return self.conv2.weight.device

    @device.setter
    def device(self, value):
        self.__dict__["_device_note"] = value

    def set_max_piece_elems(self, n):
        """Largest activation piece (elements) a residual block / head / resample handles at once."""
        for m in self.modules():
            if hasattr(m, "max_piece_elems"):
                m.max_piece_elems = int(n)
        return self

    def set_channels_last(self, enabled=True):
        """Keep conv weights and activations channels-last (faster cuDNN conv3d on recent GPUs)."""
        fmt3, fmt2 = (torch.channels_last_3d, torch.channels_last) if enabled else (torch.contiguous_format,) * 2
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt3)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt2)
        self.memory_format = fmt3
        return self

    def _prepare(self, x):
        x = x.to(device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=self.memory_format)

    # ---- frame-count rules --------------------------------------------------------------------------
    def latent_frames(self, frames):
        return (frames - 1) // ENCODE_CHUNK * (ENCODE_CHUNK // self.temporal_stride) + 1

    def pixel_frames(self, latent_frames):
        return 1 + self.temporal_stride * (latent_frames - 1)

    def check_video(self, video):
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"Wan VAE encode expects video [B,3,T,H,W], got shape {list(video.shape)}")
        t, h, w = video.shape[2:]
        if t < 1 or (t - 1) % ENCODE_CHUNK:
            latent_space.check_frame_count(t, "video frame count")
        self._check_size(h, w)

    def _check_size(self, h, w):
        s = self.spatial_stride
        if h % s or w % s:
            def near(v):
                lo = max(s, v // s * s)
                return f"{lo} or {lo + s}" if v % s else str(v)
            raise ValueError(
                f"frame size {w}×{h} (W×H) is not a multiple of {s}; the Wan VAE needs both sides divisible "
                f"by {s}: use width {near(w)} and height {near(h)} (resize or crop the frames)"
            )

    # ---- encoding -----------------------------------------------------------------------------------
    def encoder_stream(self):
        """A stateful encoder: `push(frames)` returns the latent frames completed so far."""
        return WanEncoderStream(self)

    def _encode_chunk(self, x, state):
        y = self.encoder(x, state)
        y = self.conv1(y)
        return y[:, : self.z_dim]

    def encode(self, video):
        """video [B,3,T,H,W] in -1..1 (T = 4k+1) -> raw latent mu [B,z,(T-1)/4+1,H/8,W/8]."""
        self.check_video(video)
        stream = self.encoder_stream()
        out = stream.push(video)
        stream.close()
        return out

    def encode_stream(self, chunks):
        """Iterate raw latent chunks from an iterable of video chunks [B,3,n,H,W] (any n)."""
        stream = self.encoder_stream()
        for chunk in chunks:
            z = stream.push(chunk)
            if z is not None:
                yield z
        stream.close()

    # ---- decoding -----------------------------------------------------------------------------------
    def decoder_stream(self):
        """A stateful decoder: `push(z_chunk)` decodes latent frames one at a time, cache carried."""
        return WanDecoderStream(self)

    def _decode_frame(self, z1, state):
        x = self.conv2(z1)
        x = self.decoder(x, state)
        return x.clamp_(-1.0, 1.0)

    def check_latent(self, z):
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(
                f"Wan VAE decode expects a latent [B,{self.z_dim},T,H,W], got shape {list(z.shape)}"
            )
        if z.shape[2] < 1:
            raise ValueError("Wan VAE decode got a latent with 0 frames")

    def decode_stream(self, z):
        """Yield video chunks [B,3,n,H,W] in -1..1: 1 frame for the first latent frame, then 4 each."""
        self.check_latent(z)
        stream = self.decoder_stream()
        for t in range(z.shape[2]):
            yield stream.push(z[:, :, t:t + 1])

    def decode(self, z):
        """raw latent [B,z,T,h,w] -> video [B,3,1+4(T-1),8h,8w] in -1..1 (compute dtype, model device)."""
        self.check_latent(z)
        b, _, t, h, w = z.shape
        out = None
        pos = 0
        for chunk in self.decode_stream(z):
            if out is None:
                shape = (b, 3, self.pixel_frames(t)) + tuple(chunk.shape[3:])
                out = torch.empty(shape, dtype=chunk.dtype, device=chunk.device)
            out[:, :, pos:pos + chunk.shape[2]] = chunk
            pos += chunk.shape[2]
            del chunk
        return out


class WanEncoderStream:
    """Feeds frames to the encoder in chunks of 1, 4, 4, … whatever pieces they arrive in."""

    def __init__(self, vae):
        self.vae = vae
        self.state = {}
        self.pending = None
        self.frames_in = 0
        self.started = False
        self.size = None

    def push(self, frames):
        """frames [B,3,n,H,W] in -1..1 -> raw latent [B,z,k,h,w] for the chunks now complete, or None."""
        vae = self.vae
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"Wan VAE encoder expects frames [B,3,n,H,W], got shape {list(frames.shape)}")
        size = (frames.shape[0],) + tuple(frames.shape[3:])
        if self.size is None:
            vae._check_size(*size[1:])
            self.size = size
        elif size != self.size:
            raise ValueError(f"frames of shape {list(frames.shape)} do not match the stream's earlier "
                             f"batch/size {list(self.size)}")
        self.frames_in += frames.shape[2]
        frames = vae._prepare(frames)
        buf = frames if self.pending is None else torch.cat([self.pending, frames], 2)
        self.pending = None
        outs = []
        pos = 0
        while True:
            need = ENCODE_CHUNK if self.started else 1
            if buf.shape[2] - pos < need:
                break
            outs.append(vae._encode_chunk(buf[:, :, pos:pos + need], self.state))
            self.started = True
            pos += need
        if pos < buf.shape[2]:
            self.pending = buf[:, :, pos:].clone()
        del buf
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def close(self):
        """End of the clip: raise if frames are left that do not complete a 4-frame chunk."""
        if self.pending is not None or not self.started:
            latent_space.check_frame_count(self.frames_in, "video frame count")
        self.state.clear()


class WanDecoderStream:
    """Decodes latent frames one at a time with the cache carried between calls."""

    def __init__(self, vae):
        self.vae = vae
        self.state = {}
        self.latents_in = 0

    def push(self, z):
        """raw latent [B,z,k,h,w] -> video [B,3,n,8h,8w] in -1..1 (n = 1 + 4(k-1) for the first call)."""
        vae = self.vae
        vae.check_latent(z)
        z = vae._prepare(z)
        outs = []
        for t in range(z.shape[2]):
            outs.append(vae._decode_frame(z[:, :, t:t + 1], self.state))
            self.latents_in += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def build_wan_vae(config=None, device=None, dtype=None):
    """A WanVAE (released config by default); device="meta" builds it without memory."""
    with torch.device(device or "cpu"):
        model = WanVAE(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
