"""WanDiT numerics: parity with diffusers' WanTransformer3DModel (identical random weights, every
parameter randomised incl. the zero-initialised head), the reference formulas, and the I2V image branch."""
import math

import pytest
import torch
import torch.nn.functional as F

from host.random_weights import randomize_dit
from models.wan import loading
from models.wan.dit import WanConfig, WanDiT, apply_rope, rope_freqs, rope_split, rope_tables, sinusoidal_embedding

diffusers = pytest.importorskip("diffusers")


def tiny_config(model_type="t2v", **kw):
    base = dict(model_type=model_type, dim=64, ffn_dim=96, heads=2, layers=2,
                in_dim=16 if model_type == "t2v" else 36, text_dim=32, freq_dim=16, image_dim=24, image_tokens=5)
    base.update(kw)
    return WanConfig(**base)


randomize = randomize_dit  # every parameter random, nothing left at its init


def make_pair(model_type, seed=0):
    cfg = tiny_config(model_type)
    ours = randomize(WanDiT(cfg), seed).eval()
    theirs = diffusers.WanTransformer3DModel(**loading.diffusers_config(cfg)).eval()
    theirs.load_state_dict(loading.original_to_diffusers(ours.state_dict()), strict=True)
    return cfg, ours, theirs


def inputs(cfg, batch=2, frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, 4, 6, generator=g)
    ctx = torch.randn(batch, 7, cfg.text_dim, generator=g)
    y = clip = None
    if cfg.has_image:
        y = torch.randn(batch, 20, frames, 4, 6, generator=g)
        n = cfg.image_tokens * (2 if cfg.model_type == "flf2v" else 1)
        clip = torch.randn(batch, n, cfg.image_dim, generator=g)
    return x, ctx, y, clip


def run_diffusers(theirs, cfg, x, t, ctx, y, clip):
    b = x.shape[0]
    ctx = torch.cat([ctx, ctx.new_zeros(b, cfg.text_len - ctx.shape[1], ctx.shape[2])], 1)
    xin = torch.cat([x, y], 1) if y is not None else x
    img = None
    if clip is not None:  # diffusers takes the two FLF frames as separate rows: [2B, 257, C]
        img = clip.reshape(-1, cfg.image_tokens, cfg.image_dim)
    with torch.no_grad():
        return theirs(xin, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_parity_with_diffusers_fp32(model_type):
    cfg, ours, theirs = make_pair(model_type)
    assert ours.head.head.weight.abs().min() > 0  # the zero-initialised head is random here
    x, ctx, y, clip = inputs(cfg)
    assert not torch.equal(x[:, :, 0], x[:, :, 1])  # frames differ: RoPE-t matters
    t = torch.tensor([999.0, 317.0])
    ours.sinusoid_dtype = torch.float32  # diffusers' sinusoid precision
    with torch.no_grad():
        a = ours(x, t, ctx, clip_fea=clip, y=y)
    b = run_diffusers(theirs, cfg, x, t, ctx, y, clip)
    assert a.shape == (2, 16, 3, 4, 6)
    assert b.abs().max() > 1.0
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_float64_sinusoid_close_to_diffusers(model_type):
    """The reference's float64 sinusoid differs from diffusers' float32 one by ~3e-5 at t=999; the whole
    model stays within a matching tolerance (and is bit-equal at t=0 where the sinusoid is exact)."""
    cfg, ours, theirs = make_pair(model_type, seed=3)
    x, ctx, y, clip = inputs(cfg, seed=4)
    assert ours.sinusoid_dtype == torch.float64
    with torch.no_grad():
        a = ours(x, torch.tensor([999.0, 999.0]), ctx, clip_fea=clip, y=y)
        a0 = ours(x, torch.tensor([0.0, 0.0]), ctx, clip_fea=clip, y=y)
    b = run_diffusers(theirs, cfg, x, torch.tensor([999.0, 999.0]), ctx, y, clip)
    b0 = run_diffusers(theirs, cfg, x, torch.tensor([0.0, 0.0]), ctx, y, clip)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a0 - b0).abs().max().item() <= 1e-5


def test_sinusoid_formula():
    t = torch.tensor([0.0, 1.0, 999.0])
    got = sinusoidal_embedding(t, 256)
    half = 128
    for i, tv in enumerate(t.tolist()):
        for j in (0, 1, 64, 127):
            w = 10000.0 ** (-j / half)
            assert abs(got[i, j].item() - math.cos(tv * w)) < 1e-6  # cos first
            assert abs(got[i, half + j].item() - math.sin(tv * w)) < 1e-6


def test_rope_split_and_tables():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(32) == (12, 10, 10)
    assert sum(rope_split(96)) == 96
    cos, sin = rope_tables((2, 3, 4), 128, "cpu")
    assert cos.shape == (24, 1, 64)
    # token (f=1, h=2, w=3) -> index 1*12 + 2*4 + 3; angles [ω_t·1 | ω_h·2 | ω_w·3], ω = 10000^(-2j/k)
    idx = 1 * 12 + 2 * 4 + 3
    for j, (pos, k, off) in [(0, (1, 44, 0)), (5, (1, 44, 0)), (22, (2, 42, 22)), (30, (2, 42, 22)), (43, (3, 42, 43)), (63, (3, 42, 43))]:
        jj = j - off
        ang = pos * 10000.0 ** (-2 * jj / k)
        assert abs(cos[idx, 0, j].item() - math.cos(ang)) < 1e-6
        assert abs(sin[idx, 0, j].item() - math.sin(ang)) < 1e-6
    # temporal offset: frame f of an offset table == frame f + offset of a longer table
    c_off, s_off = rope_tables((2, 3, 4), 128, "cpu", t_offset=5)
    c_long, s_long = rope_tables((7, 3, 4), 128, "cpu")
    assert torch.equal(c_off, c_long[5 * 12:])
    assert torch.equal(s_off, s_long[5 * 12:])


def test_rope_rotates_adjacent_pairs():
    x = torch.randn(1, 3, 2, 8)
    ang = torch.rand(3, 1, 4) * 6
    out = apply_rope(x, torch.complex(ang.cos(), ang.sin()))
    x0, x1 = x[..., 0::2], x[..., 1::2]  # real-valued rotation of each adjacent pair
    c, s = ang.cos(), ang.sin()
    want = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    assert torch.allclose(out, want, atol=1e-6)
    f = rope_freqs((2, 3, 4), 32, "cpu")
    assert f.dtype == torch.complex64 and torch.allclose(f.real, rope_tables((2, 3, 4), 32, "cpu")[0])


def test_temporal_offset_is_relative():
    """RoPE is relative: shifting every token's temporal position leaves the output unchanged."""
    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 5).eval()
    x, ctx, _, _ = inputs(cfg)
    with torch.no_grad():
        a = m(x, torch.tensor([500.0, 10.0]), ctx)
        b = m(x, torch.tensor([500.0, 10.0]), ctx, t_offset=7)
    assert (a - b).abs().max().item() < 1e-4
    assert not torch.equal(rope_tables((3, 2, 3), 32, "cpu", 7)[0], rope_tables((3, 2, 3), 32, "cpu", 0)[0])


def test_context_padding_and_truncation():
    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 6).eval()
    x, ctx, _, _ = inputs(cfg, batch=1)
    t = torch.tensor([600.0])
    padded = torch.cat([ctx, torch.zeros(1, 512 - ctx.shape[1], cfg.text_dim)], 1)
    longer = torch.cat([padded, torch.randn(1, 40, cfg.text_dim)], 1)  # rows past 512 are dropped
    with torch.no_grad():
        a = m(x, t, ctx)
        b = m(x, t, padded)
        c = m(x, t, longer)
        d = m(x, t, [ctx[0]])
        e = m(x, t, ctx[:, :3])
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert not torch.allclose(a, e)  # the text really conditions the output
    with pytest.raises(ValueError, match="width 768.*umT5"):
        m(x, t, torch.randn(1, 77, 768))


def test_batch_matches_single():
    cfg = tiny_config("i2v")
    m = randomize(WanDiT(cfg), 7).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([900.0, 100.0])
    with torch.no_grad():
        both = m(x, t, ctx, clip_fea=clip, y=y)
        one = m(x[1:], t[1:], ctx[1:], clip_fea=clip[1:], y=y[1:])
    assert (both[1:] - one).abs().max().item() < 1e-5


def test_image_strength_zero_removes_image_branch():
    cfg = tiny_config("i2v")
    m = randomize(WanDiT(cfg), 8).eval()
    # the same weights without any image part: a t2v-type model taking the 36 channels
    plain = WanDiT(tiny_config("t2v", in_dim=36)).eval()
    own = m.state_dict()
    plain_sd = {k: own[k] for k in plain.state_dict()}
    assert len(plain_sd) < len(own)
    plain.load_state_dict(plain_sd, strict=True)
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 400.0])
    with torch.no_grad():
        zero = m(x, t, ctx, clip_fea=clip, y=y, image_strength=0.0)
        zero_noclip = m(x, t, ctx, clip_fea=None, y=y, image_strength=0.0)
        ref = plain(torch.cat([x, y], 1), t, ctx)
        one = m(x, t, ctx, clip_fea=clip, y=y)
        one_explicit = m(x, t, ctx, clip_fea=clip, y=y, image_strength=1.0)
        half = m(x, t, ctx, clip_fea=clip, y=y, image_strength=0.5)
    assert torch.equal(zero, ref)
    assert torch.equal(zero_noclip, ref)
    assert torch.equal(one, one_explicit)
    assert (one - zero).abs().max() > 1e-3
    assert (half - zero).abs().max() > 1e-4 and (half - one).abs().max() > 1e-4


def test_flf2v_accepts_both_clip_layouts():
    cfg = tiny_config("flf2v")
    m = randomize(WanDiT(cfg), 9).eval()
    x, ctx, y, clip = inputs(cfg)  # clip [B, 10, C]
    t = torch.tensor([999.0, 999.0])
    with torch.no_grad():
        a = m(x, t, ctx, clip_fea=clip, y=y)
        b = m(x, t, ctx, clip_fea=clip.reshape(4, 5, cfg.image_dim), y=y)
    assert torch.equal(a, b)


def test_clear_errors_for_wrong_conditioning():
    t2v = randomize(WanDiT(tiny_config()), 10).eval()
    i2v = randomize(WanDiT(tiny_config("i2v")), 11).eval()
    x, ctx, _, _ = inputs(tiny_config(), batch=1)
    y = torch.randn(1, 20, 3, 4, 6)
    t = torch.tensor([500.0])
    with pytest.raises(ValueError, match="text-to-video"):
        t2v(x, t, ctx, y=y)
    with pytest.raises(ValueError, match="36 input channels"):
        i2v(x, t, ctx, clip_fea=torch.randn(1, 5, 24))
    with pytest.raises(ValueError, match="CLIP vision features"):
        i2v(x, t, ctx, y=y)
    with pytest.raises(ValueError, match="CLIP vision features must be"):
        i2v(x, t, ctx, y=y, clip_fea=torch.randn(1, 5, 1024))
    with pytest.raises(ValueError, match="multiples of 16"):
        t2v(torch.randn(1, 16, 3, 5, 6), t, ctx)


def test_bf16_compute_close_to_fp32():
    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 12).eval()
    x, ctx, _, _ = inputs(cfg)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        ref = m(x, t, ctx)
        m16 = WanDiT(cfg).eval()
        m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, assign=True)
        m16.compute_dtype = torch.bfloat16
        out = m16(x, t, ctx)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05


def test_fusable_ops_match_eager_ops():
    """The forms written for torch.compile (real-valued RoPE) compute the same as the eager ones."""
    from models.wan import dit

    cfg = tiny_config("i2v")
    m = randomize(WanDiT(cfg), 13).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 3.0])
    uncompiled = dit.Ops(dit._norm_rope_real, dit._modulate, dit._norm_affine, dit._rms_cast,
                         dit._gate_norm_affine, dit._add_modulate)
    with torch.no_grad():
        a = m(x, t, ctx, clip_fea=clip, y=y)
        m._ops = lambda _x: uncompiled
        b = m(x, t, ctx, clip_fea=clip, y=y)
    assert (a - b).abs().max().item() < 1e-5
    assert m.fused is None and WanDiT(cfg)._ops(x) is dit.EAGER  # CPU tensors never take the compiled path


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_fused_qkv_equals_three_projections(model_type):
    """SelfAttention.qkv fused (one matmul on the concatenated [3d, d] weight) equals q, k, v run one by one
    (the path the diffusers parity test holds), every bias random; the fused path really ran (q's own
    forward was skipped) and the state-dict keys stay the released q / k / v names."""
    cfg = tiny_config(model_type)
    m = randomize(WanDiT(cfg), 17).eval()
    keys = list(m.state_dict())
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 317.0])
    assert m.fused_qkv is None and m.blocks[0].self_attn.v.bias.abs().min() > 0
    calls = []
    hook = m.blocks[0].self_attn.q.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m.fused_qkv = False
        a = m(x, t, ctx, clip_fea=clip, y=y)
        assert len(calls) == 1
        m.fused_qkv = True
        b = m(x, t, ctx, clip_fea=clip, y=y)
        assert len(calls) == 1 and all(blk.self_attn.fuse_qkv for blk in m.blocks)
        hook.remove()
        assert a.abs().max() > 1.0 and (a - b).abs().max().item() <= 1e-5
        assert list(m.state_dict()) == keys and "blocks.1.self_attn.k.bias" in keys
        again = WanDiT(cfg).eval()
        again.load_state_dict(m.state_dict(), strict=True)
        again.fused_qkv = True
        assert torch.equal(again(x, t, ctx, clip_fea=clip, y=y), b)


def test_fused_qkv_sees_patched_weights():
    """ComfyUI's ModelPatcher copies a patched (LoRA) weight into the parameter in place or replaces the
    parameter; the fused weight is concatenated on every call, so it runs what the unfused model runs."""
    import copy

    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 18).eval()
    m.fused_qkv = True
    ref = copy.deepcopy(m)
    ref.fused_qkv = False
    x, ctx, _, _ = inputs(cfg)
    t = torch.tensor([600.0, 20.0])
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(cfg.dim, cfg.dim, generator=g) * 0.2
    with torch.no_grad():
        before = m(x, t, ctx)
        for model in (m, ref):
            k = model.blocks[0].self_attn.k
            k.weight.data.copy_(k.weight + delta)  # comfy.utils.copy_to_param
            model.blocks[1].self_attn.v.weight = torch.nn.Parameter(model.blocks[1].self_attn.v.weight - delta)
        a, b = m(x, t, ctx), ref(x, t, ctx)
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - before).abs().max().item() > 1e-2  # the patches changed the output


def test_fused_qkv_with_fp8_weights():
    """e4m3 weights with scales, upcast per layer (scaled fp8 files): fused equals unfused. On torch._scaled_mm
    the three projections stay separate (their scales differ), whatever fused_qkv says."""
    import copy

    from models.wan.dit import quantize_fp8_

    cfg = tiny_config()
    m = quantize_fp8_(randomize(WanDiT(cfg), 19).eval(), scaled_mm=False)
    x, ctx, _, _ = inputs(cfg)
    t = torch.tensor([400.0, 900.0])
    with torch.no_grad():
        m.fused_qkv = False
        a = m(x, t, ctx)
        m.fused_qkv = True
        b = m(x, t, ctx)
        assert (a - b).abs().max().item() <= 1e-5
        if _scaled_mm_available():
            fast = quantize_fp8_(copy.deepcopy(m))
            fast.fused_qkv = True
            calls = []
            fast.blocks[0].self_attn.q.register_forward_hook(lambda *a: calls.append(1))
            c = fast(x, t, ctx)
            fast.fused_qkv = False
            assert len(calls) == 1 and torch.equal(fast(x, t, ctx), c)


def test_pipeline_velocity_is_reference_cfg_at_integer_timesteps():
    """make_velocity_fn: two passes with the same y / clip_fea, only the text differs, model timestep
    int(σ·1000); batch_cfg gives the same result in one batched call; cfg 1 skips the negative pass."""
    from models import sampling
    from models.wan import pipeline

    cfg = tiny_config("i2v")
    m = randomize(WanDiT(cfg), 14).eval()
    x, ctx, y, clip = inputs(cfg, batch=1)
    neg = torch.randn(1, 4, cfg.text_dim)
    sigma = 0.99573
    with torch.no_grad():
        fn = pipeline.make_velocity_fn(m, ctx, neg, cfg=5.0, y=y, clip_fea=clip)
        got = fn(x, sigma)
        t = torch.tensor([995])
        vc = m(x, t, ctx, clip_fea=clip, y=y)
        vu = m(x, t, neg, clip_fea=clip, y=y)
        batched = pipeline.make_velocity_fn(m, ctx, neg, cfg=5.0, y=y, clip_fea=clip, batch_cfg=True)(x, sigma)
        single = pipeline.make_velocity_fn(m, ctx, None, cfg=1.0, y=y, clip_fea=clip)(x, sigma)
    assert sampling.timestep(sigma) == 995
    assert torch.allclose(got, vu + 5.0 * (vc - vu), atol=1e-5)
    assert (batched - got).abs().max().item() < 1e-4
    assert torch.equal(single, vc)
    with pytest.raises(ValueError, match="width 4096|umT5"):
        pipeline.make_velocity_fn(m, torch.randn(1, 77, 768), neg)


def test_sample_video_raw_space_and_denoise():
    from models import sampling
    from models.wan import latent as wan_latent
    from models.wan import pipeline

    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 15).eval()
    _, ctx, _, _ = inputs(cfg, batch=1)
    neg = torch.zeros(1, 1, cfg.text_dim)
    z = torch.zeros(1, 16, 2, 4, 6)
    a = pipeline.sample_video(m, ctx, neg, z, seed=3, steps=2, cfg=3.0, solver="euler")
    # by hand: Euler from the seeded noise in normalised space, then back to raw space
    sig = sampling.wan_sigmas(2, 5.0, "euler")
    fn = pipeline.make_velocity_fn(m, ctx, neg, 3.0)
    xs = sampling.seeded_noise(z.shape, 3)
    with torch.no_grad():
        for s0, s1 in zip(sig[:-1].tolist(), sig[1:].tolist()):
            xs = xs + (s1 - s0) * fn(xs, s0)
    assert (a - wan_latent.denormalize(xs)).abs().max().item() < 1e-5
    # denoise < 1 starts from the input latent: a different (and input-dependent) result
    src = torch.randn(1, 16, 2, 4, 6)
    b = pipeline.sample_video(m, ctx, neg, src, seed=3, steps=2, cfg=3.0, solver="euler", denoise=0.5)
    c = pipeline.sample_video(m, ctx, neg, src * 2, seed=3, steps=2, cfg=3.0, solver="euler", denoise=0.5)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


def _scaled_mm_available(device="cpu"):
    from models.wan.dit import FP8

    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0, device=device), scale_b=torch.tensor(1.0, device=device),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def test_fp8_quantize_per_tensor():
    from models.wan.dit import FP8, fp8_quantize

    w = torch.randn(48, 64) * 0.3
    q, s = fp8_quantize(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.ndim == 0
    assert s.item() == pytest.approx(w.abs().max().item() / 448.0, rel=1e-6)
    back = q.float() * s
    # e4m3 has 3 mantissa bits: round-to-nearest is within 2^-4 relative (normals), 2^-9·s absolute (subnormals)
    assert ((back - w).abs() <= w.abs() / 16 + s * 2 ** -9 + 1e-12).all()


@pytest.mark.skipif(not _scaled_mm_available(), reason="torch._scaled_mm has no kernel for fp8 on this CPU build")
def test_fp8_scaled_mm_linear_is_the_product_of_the_quantized_operands():
    """fp8_linear equals (q_x·s_x)(q_w·s_w)^T + b computed in float64 from the same fp8 operands."""
    from models.wan.dit import fp8_linear, fp8_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 64, generator=g)
    w = torch.randn(48, 64, generator=g) / 8
    b = torch.randn(48, generator=g)
    qw, sw = fp8_quantize(w)
    qx, sx = fp8_quantize(x.reshape(-1, 64))
    want = (qx.double() * sx.double()) @ (qw.double() * sw.double()).T + b.double()
    got = fp8_linear(x, qw, sw, b)
    assert got.shape == (2, 8, 48) and got.dtype == torch.float32
    assert (got.double().reshape(-1, 48) - want).abs().max().item() < 1e-4


@pytest.mark.skipif(not _scaled_mm_available(), reason="torch._scaled_mm has no kernel for fp8 on this CPU build")
def test_fp8_model_close_to_full_precision():
    """quantize_fp8_: block Linears become e4m3 + scale; velocity within 10 % (relative L2) of the float32 model
    for both the scaled-mm and the upcast path, which differ only by the activation quantization."""
    import copy

    from models.wan.dit import FP8, quantize_fp8_

    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 21).eval()
    x, ctx, _, _ = inputs(cfg, batch=1)
    t = torch.tensor([500])
    with torch.no_grad():
        ref = m(x, t, ctx)
        fast = quantize_fp8_(copy.deepcopy(m))
        upcast = quantize_fp8_(copy.deepcopy(m), scaled_mm=False)
        a, b = fast(x, t, ctx), upcast(x, t, ctx)
    assert fast.blocks[0].ffn[0].weight.dtype == FP8 and fast.blocks[0].self_attn.q.scaled_mm
    assert fast.head.head.weight.dtype == torch.float32

    def rel(u, v):
        return ((u - v).norm() / v.norm()).item()
    assert rel(a, ref) < 0.1 and rel(b, ref) < 0.1 and rel(a, b) < 0.1
    assert rel(a, ref) > 0  # really quantized


# --- fast-path switches (bench/bench_dit.py --variants times them on the GPU, each checked against plain) ---


@pytest.fixture
def traced():
    """The compiled paths traced by torch.compile with the aot_eager backend (Dynamo + AOT autograd, no code
    generation): on the CPU this checks that what the compiler sees computes what the eager path computes."""
    from models.wan import dit

    before = dit.compile_backend, set(dit._Compiled.failed)
    dit.compile_backend = "aot_eager"
    dit._Compiled.failed.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield dit
    dit.compile_backend = before[0]
    dit._Compiled.failed.clear()
    dit._Compiled.failed.update(before[1])
    torch._dynamo.reset()


def bf16_copy(m):
    m16 = WanDiT(m.config).eval()
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, assign=True)
    m16.compute_dtype = torch.bfloat16
    return m16


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_residual_stream_is_token_major_and_its_layout_changes_nothing(model_type):
    """The patchify view [B, L, D] has D-stride L, and addcmul keeps that layout block after block; the
    residual stream is made token-major once after patchify. Same values, bit for bit."""
    cfg = tiny_config(model_type)
    m = randomize(WanDiT(cfg), 31).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 41.0])
    with torch.no_grad():
        inp = m.embed(x, t, ctx, clip_fea=clip, y=y)
        h = m.run_blocks(inp, inp.x)
        a = m.finish(inp, h)
        m.contiguous_residual = False
        old = m.embed(x, t, ctx, clip_fea=clip, y=y)
        b = m(x, t, ctx, clip_fea=clip, y=y)
    assert inp.x.is_contiguous() and h.is_contiguous() and h.dtype == torch.float32
    assert not old.x.is_contiguous() and old.x.stride()[-1] == old.x.shape[1]
    assert a.abs().max() > 1.0 and torch.equal(a, b)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_compiled_groups_equal_eager(traced, model_type):
    """fused=True on the CPU: every elementwise group (the last residual update included) through
    torch.compile equals the eager ops; fuse_residual=False leaves that update to ATen."""
    cfg = tiny_config(model_type)
    m = randomize(WanDiT(cfg), 32).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([700.0, 3.0])
    with torch.no_grad():
        ref = m(x, t, ctx, clip_fea=clip, y=y)
        m.fused = True
        plan = m._ops(x)
        a = m(x, t, ctx, clip_fea=clip, y=y)
        m.fuse_residual = False
        b = m(x, t, ctx, clip_fea=clip, y=y)
    assert isinstance(plan.gate_residual, traced._Compiled) and not traced._Compiled.failed
    assert not isinstance(m._ops(x).gate_residual, traced._Compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 6
    assert ref.abs().max() > 1.0 and (a - ref).abs().max().item() <= 1e-5 and (b - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type,fused_qkv", [("t2v", True), ("t2v", False), ("i2v", True)])
def test_compiled_blocks_equal_plain(traced, model_type, fused_qkv):
    """compile_blocks: each block body as one torch.compile graph, shared by every block (one graph for the
    whole model at one input shape), equal to the plain eager path."""
    cfg = tiny_config(model_type)
    m = randomize(WanDiT(cfg), 33).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        ref = m(x, t, ctx, clip_fea=clip, y=y)
        m.compile_blocks, m.fused_qkv = True, fused_qkv
        plan = m._ops(x)
        out = m(x, t, ctx, clip_fea=clip, y=y)
        again = m(x, t, ctx, clip_fea=clip, y=y)
    assert plan.block is not None and "aot_eager" in plan.block.compiled and not traced._Compiled.failed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # 2 blocks, 2 calls: compiled once
    assert ref.abs().max() > 1.0 and (out - ref).abs().max().item() <= 1e-5 and torch.equal(out, again)


def test_compiled_blocks_under_block_swap_bit_identical(traced):
    """Block swap's hooks run around the compiled block body: the swapped copies give the resident result."""
    from models.wan.block_swap import BlockSwap

    cfg = WanConfig(model_type="t2v", dim=32, ffn_dim=48, heads=2, layers=3, text_dim=16, freq_dim=16)
    m = randomize(WanDiT(cfg), 34).eval()
    m.compile_blocks = True
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 16, 2, 4, 6, generator=g), torch.tensor([900, 400]), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = m(x, t, ctx)
        swap = BlockSwap(m, 2, offload_device="cpu")
        out = m(x, t, ctx)
        swap.remove()
    assert swap.loads == 2 and torch.equal(out, ref) and not traced._Compiled.failed


def test_bf16_residual_stream_option(traced):
    """residual_dtype = the compute dtype (ComfyUI's and diffusers' choice) keeps the stream in bf16 through the
    blocks, within the bench tolerance (3e-2 relative L2) of the float32 stream, on the eager and the
    compiled-block path; float32 / None are the reference path bit for bit; a non-float dtype is refused."""
    cfg = tiny_config("i2v")
    m = randomize(WanDiT(cfg), 35).eval()
    x, ctx, y, clip = inputs(cfg)
    t = torch.tensor([999.0, 500.0])
    m16 = bf16_copy(m)

    def rel(u, v):
        return ((u - v).norm() / v.norm()).item()
    with torch.no_grad():
        ref32 = m(x, t, ctx, clip_fea=clip, y=y)
        base = m16(x, t, ctx, clip_fea=clip, y=y)
        m16.residual_dtype = torch.float32
        assert torch.equal(m16(x, t, ctx, clip_fea=clip, y=y), base)
        m16.residual_dtype = torch.bfloat16
        inp = m16.embed(x, t, ctx, clip_fea=clip, y=y)
        h = m16.run_blocks(inp, inp.x)
        out = m16(x, t, ctx, clip_fea=clip, y=y)
        m16.compile_blocks = True
        compiled = m16(x, t, ctx, clip_fea=clip, y=y)
        m16.residual_dtype = torch.int8
        with pytest.raises(ValueError, match="residual_dtype must be None"):
            m16(x, t, ctx, clip_fea=clip, y=y)
    assert inp.x.dtype == torch.bfloat16 and h.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert 0 < rel(out, base) < 3e-2 and rel(out, ref32) < 0.05 and rel(compiled, out) < 1e-2


def test_gelu_epilogue_keeps_the_tanh_gelu_off_cuda():
    """torch's CPU _addmm_activation applies the erf GELU, not Wan's tanh form (the CUDA one is tanh): so off
    CUDA gelu_epilogue keeps the plain FFN, bit for bit."""
    g = torch.Generator().manual_seed(6)
    a, w, b = torch.randn(8, 16, generator=g) * 3, torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    fused = torch._addmm_activation(b, a, w.t(), use_gelu=True)
    assert (fused - F.gelu(F.linear(a, w, b), approximate="tanh")).abs().max() > 1e-4
    cfg = tiny_config()
    m = randomize(WanDiT(cfg), 36).eval()
    x, ctx, _, _ = inputs(cfg)
    t = torch.tensor([999.0, 10.0])
    assert m.gelu_epilogue  # the default
    with torch.no_grad():
        m.gelu_epilogue = False
        ref = m(x, t, ctx)
        m.gelu_epilogue = True
        assert torch.equal(m(x, t, ctx), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt GELU epilogue runs on CUDA only")
def test_gelu_epilogue_on_cuda():
    cfg = tiny_config()
    m = bf16_copy(randomize(WanDiT(cfg), 37).eval()).cuda()
    x, ctx, _, _ = (v.cuda() if v is not None else v for v in inputs(cfg))
    t = torch.tensor([999.0, 10.0], device="cuda")
    with torch.no_grad():
        m.gelu_epilogue = False
        ref = m(x, t, ctx)
        m.gelu_epilogue = True
        out = m(x, t, ctx)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
