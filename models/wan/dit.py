"""The Wan2.1 diffusion transformer (DiT): text-to-video, image-to-video and first-last-frame variants.

One readable file, laid out like the reference `wan/modules/model.py`, written for this pack from the
facts in REFERENCE §1. Parameter names are the original (Wan-AI / ComfyUI) names, so the state dict of a
`WanDiT` equals the key set of the released files (see `models/wan/loading.py` for the other layouts).

Numerics follow the reference:
  * the time embedding, the modulation (shift/scale/gate), the residual stream, the norms and the head
    run in float32; the big linear layers and attention run in the compute dtype (`WanDiT.dtype`,
    e.g. bfloat16), like the reference under `autocast(bfloat16)` (`WanDiT.residual_dtype` can put the
    residual stream in the compute dtype instead, as ComfyUI and diffusers do: an option, not the reference);
  * the sinusoidal time embedding is [cos, sin], in float64 by default (the reference; set
    `sinusoid_dtype=torch.float32` for diffusers' variant, 3e-5 apart at t=999);
  * text context is zero-padded (or truncated) to 512 rows and NOT masked anywhere;
  * weights may be stored in another dtype than the compute dtype (fp8_e4m3fn, fp16, ...): every layer
    casts its weight to the input's dtype when it runs (and applies a per-tensor `scale_weight` for
    "scaled fp8" files), so no full-precision copy of the model is ever kept.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention, check_backend

MODEL_TYPES = ("t2v", "i2v", "flf2v")


@dataclass
class WanConfig:
    model_type: str = "t2v"  # t2v | i2v | flf2v
    dim: int = 1536
    ffn_dim: int = 8960
    heads: int = 12
    layers: int = 30
    in_dim: int = 16  # 36 for i2v/flf2v: [noisy 16 | mask 4 | condition 16]
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280  # CLIP ViT-H penultimate width (i2v/flf2v)
    image_tokens: int = 257  # per frame; flf2v has two frames (514 position embeddings)
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {self.model_type!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for the 3D RoPE")
        self.patch_size = tuple(self.patch_size)

    @property
    def head_dim(self):
        return self.dim // self.heads

    @property
    def has_image(self):
        return self.model_type in ("i2v", "flf2v")

    def to_dict(self):
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Layers that cast their (possibly fp8 / fp16) weights to the input's dtype at compute time.


def _cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


class Linear(nn.Linear):
    """nn.Linear that runs in the input's dtype whatever the storage dtype of its weight.

    `scale_weight` (a scalar buffer, only on layers loaded from a "scaled fp8" file) multiplies the
    stored weight: real weight = stored · scale_weight.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)

    scaled_mm = False  # set by quantize_fp8_: run as an fp8 x fp8 matmul (torch._scaled_mm)

    @property
    def runs_scaled_mm(self):
        return self.scaled_mm and self.weight.dtype == FP8 and self.scale_weight is not None

    def dense_weight(self, dtype):
        """The real weight (stored · scale_weight) in `dtype`."""
        w = _cast(self.weight, dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(dtype)
        return w

    def forward(self, x):
        if self.runs_scaled_mm:
            return fp8_linear(x, self.weight, self.scale_weight, self.bias)
        return F.linear(x, self.dense_weight(x.dtype), _cast(self.bias, x.dtype))


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_quantize(t):
    """Per-tensor e4m3: (t / s) in float8_e4m3fn and the float32 scale s = amax / 448 (real value = q · s)."""
    amax = t.detach().abs().amax().float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x, weight_fp8, scale_w, bias=None):
    """x · W^T (+ b) as an fp8 x fp8 matmul with float32 accumulation: the activation is quantized per tensor
    on the fly, W is stored e4m3 with its scale; output in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, scale_x = fp8_quantize(x2)
    sw = scale_w.float().reshape(())
    try:
        out = torch._scaled_mm(xq, weight_fp8.t(), scale_a=scale_x, scale_b=sw, out_dtype=x.dtype)
    except RuntimeError:
        rows = xq.shape[0]
        if rows % 16 == 0:
            raise
        # kernels that need every dim divisible by 16: pad the token rows with zeros, drop them after
        pad = xq.new_zeros(16 - rows % 16, xq.shape[1])
        out = torch._scaled_mm(torch.cat([xq, pad]), weight_fp8.t(), scale_a=scale_x, scale_b=sw,
                               out_dtype=x.dtype)[:rows]
    if bias is not None:
        out = out + _cast(bias, x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


def e4m3_weight(w, scale=None):
    """(e4m3 weight, float32 scale) whose product is the real weight w·scale: an e4m3 tensor is kept as stored
    (with its scale, 1 without one: re-rounding it would only lose precision), anything else is quantized per
    tensor from its real value."""
    if w.dtype == FP8:
        return w, (torch.ones((), device=w.device) if scale is None else scale.float().reshape(()))
    w = w.float()
    if scale is not None:
        w = w * scale.float().reshape(())
    return fp8_quantize(w)


def quantize_fp8_(model, scaled_mm=True):
    """Store every Linear of the transformer blocks as per-tensor e4m3 weights with a float32 scale, in place;
    scaled_mm=True runs them through torch._scaled_mm (fp8 tensor cores; activations quantized per tensor),
    False keeps the upcast-per-layer path (the weights' memory halves either way). Embeddings, head and
    norms stay as they are. Returns the model."""
    with torch.no_grad():
        for block in model.blocks:
            for m in block.modules():
                if isinstance(m, Linear):
                    q, s = e4m3_weight(m.weight, m.scale_weight)
                    m.weight = nn.Parameter(q, requires_grad=False)
                    m.scale_weight = s.to(q.device)
                    m.scaled_mm = bool(scaled_mm)
    return model


def scaled_mm_unsupported(device):
    """None when torch._scaled_mm multiplies e4m3 matrices on `device`; otherwise why not, in one sentence.
    (NVIDIA GPUs need compute capability 8.9+; some torch builds also have a CPU kernel, which is slow.)"""
    device = torch.device(device)
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        where = str(device)
        if device.type == "cuda":
            where = "{} (compute capability {}.{})".format(torch.cuda.get_device_name(device),
                                                          *torch.cuda.get_device_capability(device))
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"torch {torch.__version__} has no fp8 (e4m3) scaled-matmul kernel for {where}: {reason}"
    return None


class PatchEmbed(nn.Conv3d):
    """Conv3d with kernel = stride = patch size, weight cast to the input's dtype."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)

    def forward(self, x):
        w = _cast(self.weight, x.dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(x.dtype)
        return F.conv3d(x, w, _cast(self.bias, x.dtype), stride=self.stride)


class RMSNorm(nn.Module):
    """RMS norm over the last dim (the whole model width, i.e. across heads), float32 math."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Returns float32: the caller applies RoPE (float32) before casting to the compute dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), _cast(self.weight, torch.float32), self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (optionally affine), returning float32."""

    def forward(self, x):
        return F.layer_norm(
            x.float(), self.normalized_shape, _cast(self.weight, torch.float32), _cast(self.bias, torch.float32),
            self.eps,
        )


# ---------------------------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(t, dim, dtype=torch.float64):
    """[cos, sin] embedding of timesteps t [B] with ω_j = 10000^(-j/half) -> [B, dim] float32."""
    half = dim // 2
    if dtype == torch.float64 and t.device.type == "mps":
        dtype = torch.float32
    t = t.to(dtype)
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
    arg = t[:, None] * omega[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def rope_split(head_dim):
    """Real dims per axis (t, h, w): h = w = 2·(d//6), t takes the rest (128 -> 44/42/42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid, head_dim, device, t_offset=0, theta=10000.0):
    """cos, sin tables [L, 1, head_dim/2] (float32) for tokens in row-major (f, h, w) order.

    Each axis of k real dims rotates adjacent pairs with ω_j = θ^(-2j/k) at integer positions
    (the temporal axis starts at `t_offset`).
    """
    f, h, w = grid
    angles = []
    for k, n, start in zip(rope_split(head_dim), (f, h, w), (t_offset, 0, 0)):
        omega = 1.0 / torch.pow(theta, torch.arange(0, k, 2, dtype=torch.float64) / k)
        pos = torch.arange(start, start + n, dtype=torch.float64)
        angles.append(torch.outer(pos, omega))
    a_f, a_h, a_w = angles
    full = torch.cat(
        [
            a_f[:, None, None, :].expand(f, h, w, -1),
            a_h[None, :, None, :].expand(f, h, w, -1),
            a_w[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, head_dim // 2)
    return torch.cos(full).float().to(device), torch.sin(full).float().to(device)


def rope_freqs(grid, head_dim, device, t_offset=0):
    """The rotations as one complex64 table [L, 1, head_dim/2] (cos + i·sin)."""
    cos, sin = rope_tables(grid, head_dim, device, t_offset)
    return torch.complex(cos, sin)


def apply_rope(x, freqs):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, L, H, D] (float32, contiguous) by the complex table
    [L, 1, D/2]: one complex multiply, i.e. (x0 + i·x1)·(cos + i·sin)."""
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * freqs).flatten(-2)


# ---------------------------------------------------------------------------------------------------------
# The elementwise work around the matmuls, in groups. `EAGER` runs them as plain torch ops; `fused_ops()`
# returns the same groups through torch.compile (one kernel per group on CUDA), with the RoPE written
# real-valued for the compiler. Any compile failure falls back to the eager ops for good.
# The residual stream x may be float32 (the reference) or the compute dtype (WanDiT.residual_dtype): every
# group that updates it returns it in its own dtype, computed in float32.


def _norm_rope(x, weight, eps, rope, heads, dtype):
    b, n, d = x.shape
    x = F.rms_norm(x.float(), (d,), weight.float(), eps).view(b, n, heads, d // heads)
    return apply_rope(x, rope[0]).to(dtype)


def _norm_rope_real(x, weight, eps, rope, heads, dtype):
    b, n, d = x.shape
    x = F.rms_norm(x.float(), (d,), weight.float(), eps).view(b, n, heads, d // heads // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = rope[1], rope[2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(dtype)


def _modulate(x, shift, scale, eps, dtype):
    """LN(x)·(1 + scale) + shift (float32) cast to the compute dtype."""
    return torch.addcmul(shift, F.layer_norm(x.float(), (x.shape[-1],), eps=eps), 1 + scale).to(dtype)


def _norm_affine(x, weight, bias, eps, dtype):
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(dtype)


def _rms_cast(x, weight, eps, dtype):
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(dtype)


def _gate_residual(x, y, gate):
    """x + y·gate (float32 math), in the residual stream's dtype."""
    return torch.addcmul(x, y, gate).to(x.dtype)


def _gate_norm_affine(x, y, gate, weight, bias, eps, dtype):
    """x + y·gate (the new residual) and its affine LayerNorm cast to the compute dtype."""
    x = _gate_residual(x, y, gate)
    return x, _norm_affine(x, weight, bias, eps, dtype)


def _add_modulate(x, y, shift, scale, eps, dtype):
    """x + y (the new residual) and LN(x + y)·(1 + scale) + shift in the compute dtype."""
    x = (x + y).to(x.dtype)
    return x, _modulate(x, shift, scale, eps, dtype)


def _ffn(ffn, h):
    return ffn(h)


def _ffn_gelu_epilogue(ffn, h):
    """The FFN with its first Linear and the tanh GELU as one matmul: on CUDA torch._addmm_activation runs a
    cuBLASLt GELU epilogue (tanh form), so the [tokens, ffn_dim] activation is written once instead of being
    written, read and written again by a separate GELU kernel. Elsewhere (torch's CPU kernel uses the erf
    GELU, not Wan's tanh form) and for fp8 scaled-mm layers: the plain FFN."""
    up, _, down = ffn
    if not h.is_cuda or up.runs_scaled_mm or up.bias is None:
        return ffn(h)
    z = torch._addmm_activation(_cast(up.bias, h.dtype), h.reshape(-1, h.shape[-1]), up.dense_weight(h.dtype).t(),
                                use_gelu=True)
    return down(z.view(*h.shape[:-1], z.shape[-1]))


class Ops:
    """How a block runs: its elementwise groups, its FFN, and optionally `block`, a callable that runs the
    whole block body instead (the compiled-block path; it falls back to `body` for sequence parallel)."""

    def __init__(self, norm_rope, modulate, norm_affine, rms_cast, gate_norm_affine, add_modulate,
                 gate_residual=_gate_residual, ffn=_ffn, block=None):
        self.norm_rope, self.modulate, self.norm_affine, self.rms_cast = norm_rope, modulate, norm_affine, rms_cast
        self.gate_norm_affine, self.add_modulate, self.gate_residual = gate_norm_affine, add_modulate, gate_residual
        self.ffn, self.block = ffn, block

    def replace(self, **changes):
        return Ops(**{**vars(self), **changes})


EAGER = Ops(_norm_rope, _modulate, _norm_affine, _rms_cast, _gate_norm_affine, _add_modulate)
# the forms torch.compile traces (real-valued RoPE); uncompiled they compute what EAGER computes
TRACEABLE = EAGER.replace(norm_rope=_norm_rope_real)
# torch.compile backend of the compiled paths ("inductor"; tests trace with "aot_eager" on the CPU)
compile_backend = "inductor"


class _Compiled:
    """torch.compile'd function that falls back to `eager` (and stays there) if compiling fails. `group`
    names what fails together: the elementwise groups ("ops") or the compiled blocks ("block")."""

    failed = set()

    def __init__(self, fn, eager, group="ops"):
        self.fn, self.eager, self.group, self.compiled = fn, eager, group, {}  # compile backend -> compiled fn

    def __call__(self, *args):
        if self.group not in _Compiled.failed:
            try:
                if compile_backend not in self.compiled:
                    self.compiled[compile_backend] = torch.compile(self.fn, dynamic=False, backend=compile_backend)
                return self.compiled[compile_backend](*args)
            except Exception as e:  # no Triton / compiler: the eager ops give the same result
                _Compiled.failed.add(self.group)
                import warnings

                warnings.warn(f"WanDiT: torch.compile of the {self.group} path failed ({type(e).__name__}: {e}); "
                              "running it eagerly")
        return self.eager(*args)


_COMPILED = {}


def _compiled(fn, eager):
    """One shared _Compiled per function (each compiles once, whichever plan uses it)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _Compiled(fn, eager)
    return _COMPILED[fn]


def fused_ops(fuse_residual=True):
    """The groups through torch.compile; fuse_residual=False leaves the block's last residual update
    (x + FFN·g1) to ATen's addcmul, as in the 2026-12-01 GPU runs."""
    groups = {name: _compiled(getattr(TRACEABLE, name), getattr(EAGER, name)) for name in (
        "norm_rope", "modulate", "norm_affine", "rms_cast", "gate_norm_affine", "add_modulate", "gate_residual")}
    if not fuse_residual:
        groups["gate_residual"] = EAGER.gate_residual
    return EAGER.replace(**groups)


_PLANS = {}


def block_plan(fused, fuse_residual=True, gelu_epilogue=False, compile_blocks=False):
    """The Ops a forward runs with, from WanDiT's switches (cached: compiled functions are built once)."""
    key = (bool(fused), bool(fuse_residual), bool(gelu_epilogue), bool(compile_blocks))
    if key not in _PLANS:
        ffn = _ffn_gelu_epilogue if gelu_epilogue else _ffn
        ops = fused_ops(fuse_residual) if fused else EAGER
        if gelu_epilogue:
            ops = ops.replace(ffn=ffn)
        if compile_blocks:
            ops = ops.replace(block=_compiled_block(TRACEABLE.replace(ffn=ffn), ops))
        _PLANS[key] = ops
    return _PLANS[key]


def _compiled_block(inner, fallback):
    """A whole block body as one torch.compile graph with `inner` (traceable) ops; every block runs the same
    graph (same code, parameters are graph inputs), so it compiles once per input shape. Block hooks (block
    swap) stay outside the graph: they run in the block's __call__ around it."""

    def run(block, x, e0, context, context_img, rope, image_strength, dtype, backend):
        rope = (None, rope[1], rope[2])  # the real-valued tables only: no complex tensor enters the graph
        return block.body(x, e0, context, context_img, rope, image_strength, dtype, backend, inner)

    def eager(block, *args):
        return block.body(*args, fallback)

    return _Compiled(run, eager, group="block")


# ---------------------------------------------------------------------------------------------------------
# Attention blocks


class _Projections(nn.Module):
    """q, k, v, o and the RMS q/k norms (across heads) that both attentions of a block have."""

    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(_Projections):
    # q, k, v as one [3d, d] matmul: None = on CUDA, True / False = always / never (WanDiT.fused_qkv sets it)
    fuse_qkv = None

    def qkv(self, x):
        """q(x), k(x), v(x). Fused: the weights are concatenated on every call, from whatever q/k/v hold at that
        moment, so ComfyUI weight patches (LoRA; replaced or updated in place) and block-swap copies are always
        what runs, and no second copy of the weights is kept (the concatenation is 3·d² elements, a copy far
        cheaper than the [tokens, d] x [d, 3d] matmul it feeds). fp8 layers on torch._scaled_mm keep three
        matmuls: their per-tensor scales differ."""
        fuse = self.fuse_qkv if self.fuse_qkv is not None else x.is_cuda
        layers = (self.q, self.k, self.v)
        if not fuse or any(m.runs_scaled_mm for m in layers):
            return tuple(m(x) for m in layers)
        w = torch.cat([m.dense_weight(x.dtype) for m in layers])
        b = torch.cat([_cast(m.bias, x.dtype) for m in layers])
        return F.linear(x, w, b).chunk(3, dim=-1)

    def forward(self, x, rope, backend, ops=EAGER, sp=None):
        b, n, _ = x.shape
        dtype = x.dtype
        q, k, v = self.qkv(x)
        q = ops.norm_rope(q, self.norm_q.weight, self.norm_q.eps, rope, self.heads, dtype)
        k = ops.norm_rope(k, self.norm_k.weight, self.norm_k.eps, rope, self.heads, dtype)
        v = v.view(b, n, self.heads, self.head_dim)
        if sp is not None:  # sequence parallel: x holds this rank's token shard (models/wan/parallel.py)
            return self.o(sp.attention(q, k, v, lambda q_, k_, v_: attention(q_, k_, v_, backend)))
        return self.o(attention(q, k, v, backend))


class CrossAttention(_Projections):
    """Unmasked cross-attention to the text context; i2v/flf2v add a decoupled image branch:
    out = o(Attn(q, k(text), v(text)) + λ·Attn(q, norm_k_img(k_img(img)), v_img(img)))."""

    def __init__(self, dim, heads, eps, image=False):
        super().__init__(dim, heads, eps)
        self.image = image
        if image:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context, context_img, image_strength, backend, ops=EAGER):
        b, n, _ = x.shape
        dtype = x.dtype
        q = ops.rms_cast(self.q(x), self.norm_q.weight, self.norm_q.eps, dtype).view(b, n, self.heads, self.head_dim)
        k = self.norm_k(self.k(context)).to(dtype).view(b, -1, self.heads, self.head_dim)
        v = self.v(context).view(b, -1, self.heads, self.head_dim)
        out = attention(q, k, v, backend)
        if self.image and context_img is not None and image_strength != 0:
            k_img = self.norm_k_img(self.k_img(context_img)).to(dtype).view(b, -1, self.heads, self.head_dim)
            v_img = self.v_img(context_img).view(b, -1, self.heads, self.head_dim)
            img = attention(q, k_img, v_img, backend)
            out = out + img if image_strength == 1 else out + img * image_strength
        return self.o(out)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.eps, image=cfg.has_image)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x, e0, context, context_img, rope, image_strength, dtype, backend, ops=EAGER, sp=None):
        if ops.block is not None and sp is None:
            return ops.block(self, x, e0, context, context_img, rope, image_strength, dtype, backend)
        return self.body(x, e0, context, context_img, rope, image_strength, dtype, backend, ops, sp)

    def body(self, x, e0, context, context_img, rope, image_strength, dtype, backend, ops=EAGER, sp=None):
        # x: residual stream [B, L, D] (float32, or WanDiT.residual_dtype); e0: float32 [B, 6, D]
        # (.to: ComfyUI's low-VRAM loading moves only modules that have a `weight`, so these stay behind)
        shift0, scale0, gate0, shift1, scale1, gate1 = (
            self.modulation.to(e0.device, torch.float32) + e0).unsqueeze(2).unbind(1)
        eps = self.norm1.eps
        # x = x + SelfAttn(LN1(x)·(1 + c0) + s0)·g0
        y = self.self_attn(ops.modulate(x, shift0, scale0, eps, dtype), rope, backend, ops, sp)
        # x = x + CrossAttn(LN3_affine(x), context)
        x, h = ops.gate_norm_affine(x, y, gate0, self.norm3.weight, self.norm3.bias, self.norm3.eps, dtype)
        y = self.cross_attn(h, context, context_img, image_strength, backend, ops)
        # x = x + FFN(LN2(x)·(1 + c1) + s1)·g1   (computed in float32)
        x, h = ops.add_modulate(x, y, shift1, scale1, eps, dtype)
        return ops.gate_residual(x, ops.ffn(self.ffn, h), gate1)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.to(e.device, torch.float32) + e[:, None]).unsqueeze(2).unbind(1)
        return self.head(self.norm(x) * (1 + scale) + shift)  # float32, as the reference


class ImageEmbedding(nn.Module):
    """img_emb: LayerNorm(1280) -> Linear -> GELU -> Linear(1280, D) -> LayerNorm(D) (+ emb_pos for flf2v)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        c = cfg.image_dim
        self.proj = nn.Sequential(
            LayerNorm(c), Linear(c, c), nn.GELU(), Linear(c, cfg.dim), LayerNorm(cfg.dim)
        )
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * cfg.image_tokens, c))

    def forward(self, clip_fea, dtype):
        if hasattr(self, "emb_pos"):
            clip_fea = clip_fea.float() + self.emb_pos.to(clip_fea.device, torch.float32)
        norm0, lin1, act, lin3, norm4 = self.proj
        h = lin1(norm0(clip_fea).to(dtype))
        h = lin3(act(h))
        return norm4(h).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The model


class BlockInputs:
    """What the blocks and the head need besides the residual stream (see `WanDiT.embed`)."""

    BATCHED = ("x", "e", "e0", "context", "context_img")

    def __init__(self, x, e, e0, context, context_img, rope, grid, length, image_strength, dtype, backend, ops, sp):
        self.x, self.e, self.e0, self.context, self.context_img = x, e, e0, context, context_img
        self.rope, self.grid, self.length, self.image_strength = rope, grid, length, image_strength
        self.dtype, self.backend, self.ops, self.sp = dtype, backend, ops, sp

    def rows(self, index):
        """The same inputs for a subset of the batch (index: a LongTensor of rows)."""
        out = BlockInputs(**{k: getattr(self, k) for k in (
            "x", "e", "e0", "context", "context_img", "rope", "grid", "length", "image_strength", "dtype",
            "backend", "ops", "sp")})
        for k in self.BATCHED:
            v = getattr(self, k)
            if v is not None:
                setattr(out, k, v.index_select(0, index.to(v.device)))
        return out


class WanDiT(nn.Module):
    """Wan2.1 DiT. `forward(x, t, context, clip_fea=None, y=None, image_strength=1.0) -> velocity`."""

    def __init__(self, config: WanConfig = None, attention_backend="sdpa", **kwargs):
        super().__init__()
        cfg = config if config is not None else WanConfig(**kwargs)
        self.config = cfg
        self.attention_backend = check_backend(attention_backend)
        self.sinusoid_dtype = torch.float64
        # torch.compile the elementwise groups on CUDA (None: when Triton is importable; False: never)
        self.fused = None
        # more fast-path switches (bench/bench_dit.py --variants times them side by side, each checked against
        # the plain path): the block's last residual update inside the compiled groups (with `fused`); the
        # FFN's Linear + tanh GELU as one cuBLASLt matmul (CUDA only; on by default since the 2026-12-01 third
        # run: 0.968x ComfyUI's forward at 1.3B, 0.982x at 14B, and a smaller activation peak); every block body as one torch.compile graph;
        # the residual stream's dtype (None: float32, the reference; the compute dtype is ComfyUI's and
        # diffusers' choice, ~1e-2 apart at bf16); token-major (contiguous) residual stream, False keeps the
        # patchify layout [B, L, D] with D-stride L that every block ran on in the 2026-12-01 GPU runs
        self.fuse_residual = True
        self.gelu_epilogue = True
        self.compile_blocks = False
        self.residual_dtype = None
        self.contiguous_residual = True
        self.compute_dtype = None  # None: the dtype of the big weights (set by the loader)
        d = cfg.dim
        self.patch_embedding = PatchEmbed(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.layers)])
        self.head = Head(cfg)
        if cfg.has_image:
            self.img_emb = ImageEmbedding(cfg)
        self._rope_cache = {}

    # -- dtype helpers (ComfyUI's ModelPatcher asks get_dtype()) --
    @property
    def dtype(self):
        if self.compute_dtype is not None:
            return self.compute_dtype
        w = self.blocks[0].self_attn.q.weight if len(self.blocks) else self.head.head.weight
        return w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    def get_dtype(self):
        return self.dtype

    @property
    def fused_qkv(self):
        """Self-attention q, k, v as one matmul (SelfAttention.qkv): None = on CUDA (default), True / False."""
        return self.blocks[0].self_attn.fuse_qkv if len(self.blocks) else None

    @fused_qkv.setter
    def fused_qkv(self, value):
        for block in self.blocks:
            block.self_attn.fuse_qkv = value

    @property
    def device(self):
        """Where the weights are (read from them; ComfyUI's ModelPatcher assigns `.device`, which is kept
        only as a note so the two can never disagree)."""
        return self.head.head.weight.device

    @device.setter
    def device(self, value):
        self.__dict__["_device_note"] = value

    def _rope(self, grid, device, t_offset):
        key = (tuple(grid), str(device), int(t_offset))
        tables = self._rope_cache.get(key)
        if tables is None:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            cos, sin = rope_tables(grid, self.config.head_dim, device, t_offset)
            tables = (torch.complex(cos, sin), cos, sin)
            self._rope_cache[key] = tables
        return tables

    def _ops(self, x):
        fused = self.fused
        if fused is None:
            fused = x.is_cuda and _triton_available()
        # the GELU epilogue is a cuBLASLt kernel: off CUDA the plan is the plain one (EAGER on the CPU)
        return block_plan(fused, self.fuse_residual, self.gelu_epilogue and x.is_cuda, self.compile_blocks)

    def _residual_dtype(self):
        dtype = self.residual_dtype or torch.float32
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
            raise ValueError(f"WanDiT.residual_dtype must be None (float32), torch.float32, torch.bfloat16 or "
                             f"torch.float16, not {dtype!r}")
        return dtype

    def prepare_context(self, context):
        """Text [B, L, text_dim] (or a list of [L_i, text_dim]) -> [B, 512, text_dim], zero-padded or truncated."""
        cfg = self.config
        items = list(context) if isinstance(context, (list, tuple)) else [c for c in context]
        out = []
        for c in items:
            if c.ndim != 2 or c.shape[-1] != cfg.text_dim:
                raise ValueError(
                    f"text conditioning has width {c.shape[-1]} (shape {list(c.shape)}), but this Wan model "
                    f"expects umT5-XXL embeddings of width {cfg.text_dim}: encode the prompt with "
                    "CLIPLoader(type='wan', umt5_xxl) + CLIPTextEncode, not an SD/SDXL CLIP"
                )
            c = c[: cfg.text_len]
            if c.shape[0] < cfg.text_len:
                c = torch.cat([c, c.new_zeros(cfg.text_len - c.shape[0], c.shape[1])])
            out.append(c)
        return torch.stack(out)

    def _check_inputs(self, x, clip_fea, y):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be a video latent [B, C, F, H, W], got shape {list(x.shape)}")
        if not cfg.has_image:
            if y is not None or clip_fea is not None:
                raise ValueError(
                    "image conditioning (y / clip_fea) was given to a text-to-video Wan model; load an "
                    "I2V or FLF2V checkpoint, or remove the image conditioning"
                )
        if y is not None:
            x = torch.cat([x, y.to(x.device, x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            extra = (
                " (an image-to-video model needs y = [mask 4 | condition latent 16] from an I2V conditioner)"
                if cfg.has_image and y is None else ""
            )
            raise ValueError(
                f"this Wan {cfg.model_type} model takes {cfg.in_dim} input channels but got {x.shape[1]}{extra}"
            )
        ph, pw = cfg.patch_size[1:]
        if x.shape[3] % ph or x.shape[4] % pw or x.shape[2] % cfg.patch_size[0]:
            raise ValueError(
                f"latent size {list(x.shape[2:])} is not divisible by the patch size {list(cfg.patch_size)}; "
                "use a width and height that are multiples of 16 pixels"
            )
        return x

    def embed_image(self, clip_fea, batch, dtype):
        cfg = self.config
        if clip_fea.ndim != 3 or clip_fea.shape[-1] != cfg.image_dim:
            raise ValueError(
                f"CLIP vision features must be [B, 257, {cfg.image_dim}] (clip_vision_h penultimate hidden "
                f"states), got shape {list(clip_fea.shape)}"
            )
        if cfg.model_type == "flf2v":
            # both frames' features: [2B, 257, C] or already [B, 514, C]
            clip_fea = clip_fea.reshape(-1, 2 * cfg.image_tokens, cfg.image_dim)
        if clip_fea.shape[0] == 1 and batch > 1:
            clip_fea = clip_fea.expand(batch, -1, -1)
        if clip_fea.shape[0] != batch:
            raise ValueError(f"CLIP features for {clip_fea.shape[0]} videos given with a batch of {batch}")
        return self.img_emb(clip_fea.to(self.device), dtype)

    def forward(self, x, t, context, clip_fea=None, y=None, image_strength=1.0, t_offset=0, sequence_parallel=None):
        """x [B, 16 (or in_dim), F, H, W] normalised latent; t [B] timesteps in 0..1000; context [B, L, 4096]
        (padded/truncated to 512 rows here); clip_fea [B, 257, 1280] (i2v) or [B, 514, 1280] / [2B, 257, 1280]
        (flf2v); y [B, 20, F, H, W] = mask 4 + condition latent 16 (i2v/flf2v), concatenated after x;
        image_strength λ scales the image branch (0 removes it); t_offset shifts the temporal RoPE positions;
        sequence_parallel: a models.wan.parallel.SequenceParallel — every rank passes the full inputs, works
        on its shard of the tokens and gets the full output. Returns the velocity [B, 16, F, H, W] in float32.

        The same three stages are public for the step cache (models/wan/step_cache.py):
        `embed(...) -> BlockInputs`, `run_blocks(inputs, x, start, end)`, `finish(inputs, x)`."""
        inp = self.embed(x, t, context, clip_fea, y, image_strength, t_offset, sequence_parallel)
        return self.finish(inp, self.run_blocks(inp, inp.x))

    def embed(self, x, t, context, clip_fea=None, y=None, image_strength=1.0, t_offset=0, sequence_parallel=None):
        """Everything before the blocks: checks, patchify, time / text / image embeddings, RoPE tables."""
        cfg = self.config
        dtype = self.dtype
        backend = self.attention_backend
        x = self._check_inputs(x, clip_fea, y)
        b = x.shape[0]
        device = self.device

        # patchify: tokens in row-major (f, h, w) order
        x = self.patch_embedding(x.to(device, dtype))
        grid = x.shape[2:]
        # residual stream [B, L, D], float32 unless residual_dtype says otherwise; token-major, so the per-token
        # norms of every block read it in rows (the patchify view has D-stride L and stays so through addcmul)
        x = x.flatten(2).transpose(1, 2).to(self._residual_dtype())
        if self.contiguous_residual:
            x = x.contiguous()
        rope = self._rope(grid, device, t_offset)

        # time: [cos, sin] sinusoid -> e [B, D] and e0 [B, 6, D], float32
        t = torch.as_tensor(t, device=device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != b:
            raise ValueError(f"{t.shape[0]} timesteps given for a batch of {b}")
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim, self.sinusoid_dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))

        # text: 512 zero-padded rows, unmasked
        context = self.prepare_context(context).to(device, dtype)
        if context.shape[0] == 1 and b > 1:
            context = context.expand(b, -1, -1)
        if context.shape[0] != b:
            raise ValueError(f"text conditioning for {context.shape[0]} videos given with a batch of {b}")
        context = self.text_embedding(context)

        context_img = None
        if cfg.has_image:
            if clip_fea is not None and image_strength != 0:
                context_img = self.embed_image(clip_fea, b, dtype)
            elif clip_fea is None and image_strength != 0:
                raise ValueError(
                    f"this Wan {cfg.model_type} model needs CLIP vision features (clip_fea) of the input image(s); "
                    "connect a CLIP vision output to the I2V conditioner, or set the image strength to 0"
                )

        sp = sequence_parallel
        length = x.shape[1]
        if sp is not None:
            x = sp.shard(x, dim=1)
            rope = tuple(sp.shard(r, dim=0) for r in rope)
        return BlockInputs(x, e, e0, context, context_img, rope, grid, length, image_strength, dtype, backend,
                           self._ops(x), sp)

    def run_blocks(self, inp, x, start=0, end=None):
        """Blocks [start, end) on the residual stream x [B, L, D] (float32 unless residual_dtype is set)."""
        for block in self.blocks[start:end]:
            x = block(x, inp.e0, inp.context, inp.context_img, inp.rope, inp.image_strength, inp.dtype, inp.backend,
                      inp.ops, inp.sp)
        return x

    def finish(self, inp, x):
        """The head and unpatchify: residual stream [B, L, D] -> velocity [B, 16, F, H, W] (float32)."""
        x = self.head(x, inp.e)  # per token: shards gathered after it (4·16 values a token instead of D)
        if inp.sp is not None:
            x = inp.sp.gather(x, inp.length, dim=1)
        return self.unpatchify(x, inp.grid)

    def unpatchify(self, x, grid):
        """[B, L, pt·ph·pw·Co] -> [B, Co, F·pt, H·ph, W·pw]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)


def _triton_available():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def build_model(config: WanConfig, device="meta", attention_backend="sdpa"):
    """A WanDiT on `device` (meta: no memory, for `load_state_dict(assign=True)` or key-set checks)."""
    with torch.device(device):
        return WanDiT(config, attention_backend=attention_backend)
