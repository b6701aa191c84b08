"""Long-video algorithms: plans, perturbation, substitution, guidance, colour anchoring, flat memory."""
import gc
import math

import pytest
import torch

from models import conditioning as C
from models import long_video as LV
from models import sampling


# ------------------------------------------------------------------------------------ masks / plans

def test_mask_positions_predict_interpolate_unconditional():
    ext = LV.plan_extension(3, segment_frames=17, overlap_frames=5)
    assert ext[0].kind == "unconditional" and ext[0].known == ()
    m_pred = C.frame_mask(17, ext[1].known, 1, 1)[:, :, 0, 0]
    # 5 known pixel frames = latent frames 0 and 1 entirely, nothing after.
    assert torch.all(m_pred[:, :2] == 1) and torch.all(m_pred[:, 2:] == 0)
    interp = LV.plan_interpolation(3, frames_between=3)
    m_int = C.frame_mask(interp[0].length, interp[0].known, 1, 1)[:, :, 0, 0]
    assert interp[0].known == (0, 4)
    assert torch.all(m_int[:, 0] == 1) and m_int[:, 1].tolist() == [0, 0, 0, 1]
    m_unc = C.frame_mask(17, ext[0].known, 1, 1)
    assert torch.all(m_unc == 0)


def test_extension_plan_bookkeeping():
    plan = LV.plan_extension(4, segment_frames=21, overlap_frames=5)
    assert [s.start for s in plan] == [0, 16, 32, 48]
    assert [s.keep for s in plan] == [(0, 21), (5, 21), (5, 21), (5, 21)]
    total = LV.check_plan(plan)
    assert total == 21 + 3 * 16 == LV.plan_total_frames(plan)
    assert (total - 1) % 4 == 0
    for prev, s in zip(plan, plan[1:]):
        assert s.known_global == tuple(range(prev.kept_global[1] - 5, prev.kept_global[1]))
    cont = LV.plan_extension(2, segment_frames=13, overlap_frames=1, initial_frames=9)
    assert cont[0].known_global == (8,) and cont[0].kept_global == (9, 21) and cont[1].kept_global == (21, 33)
    with pytest.raises(ValueError, match="4k\\+1"):
        LV.plan_extension(2, segment_frames=20, overlap_frames=5)
    with pytest.raises(ValueError, match="4k\\+1"):
        LV.plan_extension(2, segment_frames=21, overlap_frames=4)
    with pytest.raises(ValueError, match="shorter"):
        LV.plan_extension(2, segment_frames=9, overlap_frames=9)


@pytest.mark.parametrize("K,g", [(5, 3), (4, 1), (5, 1), (6, 2), (3, 7), (2, 3)])
def test_interpolation_plan_keyframes_once_and_in_place(K, g):
    plan = LV.plan_interpolation(K, frames_between=g)
    step = g + 1
    total = LV.check_plan(plan, first_global=0)
    assert total == (K - 1) * step + 1
    for s in plan:
        assert (s.length - 1) % 4 == 0
        # every keyframe inside the segment is known, nothing else
        assert set(s.known_global) == {j * step for j in range(K) if s.start <= j * step < s.start + s.length}
    # stitching: label frames by global index and check each keyframe appears once at j*(g+1)
    out = _run_labelled(plan, {j * step: torch.full((1, 1, 3), float(j * step)) for j in range(K)})
    assert out.tolist() == list(range(total))


def _run_labelled(plan, given):
    emitted = []

    def sample_segment(seg, known):
        for k, f in known.items():
            assert float(f[0, 0, 0]) == seg.start + k  # the right frame reached the right position
        return torch.tensor([seg.start, seg.length])

    def decode(lat):
        start, n = int(lat[0]), int(lat[1])
        return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 1, 3).clone()

    LV.generate_long(plan, sample_segment, decode, lambda fr, seg: emitted.append(fr[:, 0, 0, 0]),
                     given_frames=given)
    return torch.cat(emitted).to(torch.int64)


def test_extension_driver_stitches_without_duplicates():
    plan = LV.plan_extension(5, segment_frames=13, overlap_frames=5)
    out = _run_labelled(plan, {})
    assert out.tolist() == list(range(LV.plan_total_frames(plan)))


# --------------------------------------------------------------------------------- perturbation

def test_perturbation_formula_exact():
    z = torch.randn(1, 16, 2, 3, 4)
    s = 0.1
    zs = LV.perturb(z, s, seed=42)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(zs, (1 - s) * z + s * eps)
    assert torch.equal(LV.perturb(z, s, seed=42), zs)
    assert torch.equal(LV.perturb(z, 0.0, seed=1), z)
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
        LV.perturb(z, 1.0, seed=0)


# --------------------------------------------------------------------------------- substitution

@pytest.mark.parametrize("solver,level", [("euler", 0.0), ("unipc", 0.1), ("dpmpp_2m", 0.3)])
def test_substitution_keeps_known_frames_at_the_stated_level(solver, level):
    torch.manual_seed(0)
    shape = (1, 4, 5, 2, 3)
    z = torch.randn(shape)
    known = [0, 1]
    cond = LV.perturb(z, level, seed=3)
    noise = torch.randn(shape)
    sub = LV.FrameSubstitution(cond, known, level=level, noise=noise)
    seen = []

    def model(x, sigma):
        seen.append((sigma, x[:, :, known].clone()))
        return torch.tanh(x) + sigma

    sig = sampling.wan_sigmas(8, 2.0, solver)
    out = sub.finalize(sampling.sample(sub.wrap(model), sampling.seeded_noise(shape, 9), sig, solver))
    assert len(seen) == 8
    below = 0
    for sigma, xk in seen:
        if sigma <= level:
            expect = cond[:, :, known]
            below += 1
        else:
            a = (1 - sigma) / (1 - level)
            b = math.sqrt(sigma ** 2 - (a * level) ** 2)
            expect = a * cond[:, :, known] + b * noise[:, :, known]
            # the marginal noise level is σ: coefficient of z is (1-σ), total noise std σ
            assert abs(a * (1 - level) - (1 - sigma)) < 1e-12
            assert abs((a * level) ** 2 + b ** 2 - sigma ** 2) < 1e-12
        assert torch.allclose(xk, expect, atol=1e-6)
    if level >= 0.3:
        assert below > 0  # the "never below s" branch was exercised
    assert torch.equal(out[:, :, known], cond[:, :, known])
    assert not torch.allclose(out[:, :, 2:], cond[:, :, 2:])


def test_substitution_condition_prefix_is_exact_reencode():
    """The condition latent of the known prefix is encode(prefix) as a clip start (causal VAE rule)."""
    calls = []

    def encode(frames):
        calls.append(frames.shape[0])
        t = (frames.shape[0] - 1) // 4 + 1
        return frames.mean(dim=(1, 2, 3)).cumsum(0)[::4][:t].view(1, 1, t, 1, 1).expand(1, 16, t, 1, 1)

    frames = {k: torch.full((2, 2, 3), 0.1 * (k + 1)) for k in range(5)}
    lat, known = LV.substitution_condition(encode, frames, 13)
    assert known == [0, 1] and calls == [5]
    assert torch.equal(lat[:, :, :2], encode(torch.stack([frames[k] for k in range(5)])))
    assert torch.all(lat[:, :, 2:] == 0)
    lat2, known2 = LV.substitution_condition(encode, {0: frames[0], 12: frames[4]}, 13)
    assert known2 == [0, 3]


# ------------------------------------------------------------------------------------- guidance

def _counted(value):
    calls = {"n": 0}

    def fn(x, sigma):
        calls["n"] += 1
        return torch.full_like(x, value)
    return fn, calls


@pytest.mark.parametrize("g,w", [(5.0, 0.0), (5.0, 0.5), (1.0, 0.3), (1.0, 0.0), (3.0, -0.2)])
def test_guidance_combination_and_skipped_passes(g, w):
    vc, nc = _counted(2.0)
    vtu, ntu = _counted(-1.0)
    vfu, nfu = _counted(0.5)
    fn = LV.guided_velocity_fn(vc, vtu, vfu, g=g, w=w)
    x = torch.zeros(3)
    out = fn(x, 0.5)
    expect = (-1.0 + g * (2.0 + 1.0) if g != 1 else 2.0) + w * (2.0 - 0.5)
    assert torch.allclose(out, torch.full((3,), expect))
    # each term separately: text term only, frame term only
    assert torch.allclose(LV.guided_velocity_fn(vc, vtu, vfu, g=g, w=0.0)(x, 0.5),
                          torch.full((3,), -1.0 + g * 3.0))
    assert torch.allclose(LV.guided_velocity_fn(vc, vtu, vfu, g=1.0, w=w)(x, 0.5),
                          torch.full((3,), 2.0 + w * 1.5))
    nc["n"] = ntu["n"] = nfu["n"] = 0
    sampling.sample(fn, torch.zeros(3), sampling.wan_sigmas(4, 5.0), "euler")
    assert nc["n"] == 4
    assert ntu["n"] == (4 if g != 1 else 0)
    assert nfu["n"] == (4 if w != 0 else 0)


def test_guidance_batched_single_call():
    calls = []

    def batched(x, sigma, names):
        calls.append(tuple(names))
        vals = {"cond": 2.0, "text_uncond": -1.0, "frame_uncond": 0.5}
        return {n: torch.full_like(x, vals[n]) for n in names}

    fn = LV.guided_velocity_fn(None, None, None, g=4.0, w=0.25, batched=batched)
    out = fn(torch.zeros(2), 0.3)
    assert calls == [("cond", "text_uncond", "frame_uncond")]
    assert torch.allclose(out, torch.full((2,), -1.0 + 4.0 * 3.0 + 0.25 * 1.5))
    calls.clear()
    LV.guided_velocity_fn(None, None, None, g=4.0, w=0.0, batched=batched)(torch.zeros(2), 0.3)
    assert calls == [("cond", "text_uncond")]
    assert torch.equal(LV.frame_unconditional_y(torch.ones(1, 20, 2, 1, 1)), torch.zeros(1, 20, 2, 1, 1))


# ------------------------------------------------------------------------------------- colour

def test_color_anchor_matches_lab_statistics():
    g = torch.Generator().manual_seed(0)
    ref = 0.3 + 0.4 * torch.rand(2, 8, 8, 3, generator=g)
    new = (0.35 + 0.3 * torch.rand(3, 8, 8, 3, generator=g)) * torch.tensor([1.0, 0.8, 0.6])
    out = LV.color_anchor(new, ref, 1.0)
    rmu, rsd = LV.lab_stats(ref)
    omu, osd = LV.lab_stats(out)
    nmu, _ = LV.lab_stats(new)
    assert (omu - rmu).abs().max() < 0.5 < (nmu - rmu).abs().max()
    assert (osd - rsd).abs().max() < 0.5
    assert torch.equal(LV.color_anchor(new, ref, 0.0), new)


# ------------------------------------------------------------------------------- flat memory

def _live_tensor_bytes():
    total = 0
    for o in gc.get_objects():
        if type(o) is torch.Tensor:  # exact type: no isinstance hooks on foreign objects
            try:
                total += o.untyped_storage().nbytes()
            except Exception:
                pass
    return total


def _peak_for(n_segments):
    plan = LV.plan_extension(n_segments, segment_frames=13, overlap_frames=5)
    peak = {"bytes": 0}
    sink = {"frames": 0, "sum": 0.0}

    def probe():
        peak["bytes"] = max(peak["bytes"], _live_tensor_bytes())

    def sample_segment(seg, known):
        lat = torch.randn(1, 16, 4, 8, 8)  # tiny fake model
        if known:
            lat[:, :, 0] += torch.stack(list(known.values())).mean()
        probe()
        return lat

    def decode(lat):
        frames = torch.sigmoid(lat[0, :3].permute(1, 2, 3, 0)).repeat_interleave(4, 0)[:13]
        frames = frames.repeat_interleave(8, 1).repeat_interleave(8, 2).contiguous()
        probe()
        return frames

    def emit(frames, seg):
        sink["frames"] += frames.shape[0]
        sink["sum"] += float(frames.sum())  # written out / moved off-device in real use

    LV.generate_long(plan, sample_segment, decode, emit, metrics_hook=lambda r, f: probe())
    assert sink["frames"] == LV.plan_total_frames(plan)
    return peak["bytes"]


def test_memory_flat_in_number_of_segments():
    gc.collect()
    base = _live_tensor_bytes()
    p3 = _peak_for(3) - base
    gc.collect()
    p10 = _peak_for(10) - base
    one_segment = 13 * 64 * 64 * 3 * 4
    assert p3 > one_segment  # the probe sees the decoded segment
    assert p10 <= p3 + 1024, (p3, p10)  # peak does not grow with the number of segments


def test_metrics_hook_reports_seam_error():
    plan = LV.plan_extension(3, segment_frames=9, overlap_frames=1)
    got = []

    def sample_segment(seg, known):
        return seg.index

    def decode(idx):
        return torch.full((9, 2, 2, 3), 0.1 * (idx + 1))

    LV.generate_long(plan, sample_segment, decode, lambda f, s: None, metrics_hook=lambda r, f: got.append(r))
    assert [r.index for r in got] == [0, 1, 2]
    assert math.isnan(got[0].seam_error)
    assert abs(got[1].seam_error - 0.1) < 1e-6 and abs(got[2].seam_error - 0.1) < 1e-6
    assert len(got[1].lab_mean) == 3


# ---------------------------------------------------------------------- Wan velocity function

class FakeDiT:
    """Records every forward; the velocity depends on the input, text, y and t so mistakes show."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, clip_fea=None, y=None, image_strength=1.0):
        self.calls.append({"x": x.clone(), "t": t.clone(), "ctx": context.clone(), "y": None if y is None else y.clone(),
                           "batch": x.shape[0]})
        text = context.sum(dim=(1, 2)) / 16.0  # like the DiT: rows zero-padded to a fixed length
        v = torch.tanh(x) + text.view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) * 1e-3
        if y is not None:
            v = v + y.mean(dim=1, keepdim=True)
        return v


@pytest.mark.parametrize("use_y", [True, False])
def test_wan_velocity_passes_and_batched_equivalence(use_y):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 3, 2, 2)
    pos, neg = torch.randn(1, 7, 8), torch.randn(1, 5, 8)
    y = torch.randn(1, 20, 3, 2, 2) if use_y else None
    sub = None if use_y else LV.FrameSubstitution(torch.randn(1, 16, 3, 2, 2), [0], level=0.1, noise=torch.randn(1, 16, 3, 2, 2))
    model = FakeDiT()
    fn = LV.wan_velocity_fn(model, pos, neg, cfg_scale=4.0, y=y, frame_guidance=0.5, substitution=sub)
    v = fn(x, 0.5)
    assert len(model.calls) == 3
    c, tu, fu = model.calls
    assert int(c["t"][0]) == sampling.timestep(0.5) == 500
    assert torch.equal(c["ctx"], pos) and torch.equal(tu["ctx"], neg) and torch.equal(fu["ctx"], pos)
    if use_y:
        assert torch.equal(c["y"], y) and torch.equal(tu["y"], y) and torch.all(fu["y"] == 0)
    else:
        assert torch.equal(c["x"], sub.apply(x, 0.5)) and torch.equal(fu["x"], x)
    model.calls.clear()
    vb = LV.wan_velocity_fn(model, pos, neg, cfg_scale=4.0, y=y, frame_guidance=0.5, substitution=sub, batched=True)(x, 0.5)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 3
    assert torch.allclose(v, vb, atol=1e-6)
    model.calls.clear()
    LV.wan_velocity_fn(model, pos, neg, cfg_scale=4.0, y=y, frame_guidance=0.0, substitution=sub)(x, 0.5)
    assert len(model.calls) == 2  # w = 0: no frame-unconditional pass


def test_color_anchoring_removes_compounding_drift():
    """A fake generator that shifts each segment's colour relative to its condition frames (the drift users see
    after a few extensions): without anchoring the LAB mean drifts segment after segment; with it, it stays."""
    plan = LV.plan_extension(6, segment_frames=9, overlap_frames=1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    field = torch.stack([0.3 + 0.4 * xx, 0.3 + 0.3 * yy, 0.5 - 0.2 * xx * yy], -1)
    bias = torch.tensor([0.04, 0.0, -0.03])

    def run(strength):
        stats = []

        def sample_segment(seg, known):
            start = known[0] if known else field
            # the content moves (rolls) while the colours should stay; each segment adds a colour cast
            frames = torch.stack([torch.roll(start, k, dims=1) for k in range(9)])
            return (frames + (bias if known else 0)).clamp(0, 1)

        LV.generate_long(plan, sample_segment, lambda z: z, lambda f, s: None, color_anchoring=strength,
                         metrics_hook=lambda r, f: stats.append(r.lab_mean))
        return torch.tensor(stats)

    free, anchored = run(0.0), run(1.0)
    drift_free = (free[-1] - free[0]).abs().max().item()
    drift_anchored = (anchored[-1] - anchored[0]).abs().max().item()
    print(f"LAB mean drift after 6 segments: {drift_free:.2f} without anchoring, {drift_anchored:.2f} with")
    assert drift_free > 5.0
    assert drift_anchored < 0.25 * drift_free
