"""First-block step cache (models/wan/step_cache.py).

Oracles: the plain sampling loop (pipeline.sample_video without a cache) on the same tiny random model; the
number of full forwards is counted independently by a hook on the LAST block (it runs only when every block
runs); the skip rule is checked on a scripted fake model against the formula d = mean|r1 − r1_prev| /
mean|r1_prev| written out in the test.
"""

import pytest
import torch

from models import long_video
from models.wan import pipeline
from host.random_weights import randomize_dit
from models.wan.dit import BlockInputs, WanConfig, WanDiT
from models.wan.step_cache import CachedModel, StepCache


def tiny_model(model_type="t2v", seed=0, layers=4):
    cfg = WanConfig(model_type=model_type, dim=32, ffn_dim=48, heads=2, layers=layers, text_dim=16, freq_dim=16,
                    in_dim=16 if model_type == "t2v" else 36, image_dim=8, image_tokens=3)
    return randomize_dit(WanDiT(cfg).eval(), seed)


def texts(seed=1, dim=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5, dim, generator=g), torch.randn(1, 3, dim, generator=g)


class RowCounter:
    """Counts the batch rows that went through the last block (= rows that ran every block)."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.blocks[-1].register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.rows += args[0].shape[0]

    def close(self):
        self.handle.remove()


Z = torch.zeros(1, 16, 2, 4, 6)


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_threshold_zero_and_never_skipping_are_bit_identical(batch_cfg):
    m = tiny_model()
    pos, neg = texts()
    kw = dict(seed=5, steps=4, cfg=4.0, shift=5.0, solver="unipc", batch_cfg=batch_cfg)
    plain = pipeline.sample_video(m, pos, neg, Z, **kw)
    assert torch.equal(plain, pipeline.sample_video(m, pos, neg, Z, step_cache=0.0, **kw))
    off = StepCache(0.0)
    assert torch.equal(plain, pipeline.sample_video(m, pos, neg, Z, step_cache=off, **kw))
    # a threshold no change can fall below: the cached code path runs every block, and is bit-identical
    counter = RowCounter(m)
    never = StepCache(1e-30)
    out = pipeline.sample_video(m, pos, neg, Z, step_cache=never, **kw)
    counter.close()
    assert torch.equal(plain, out)
    assert never.full == never.calls == counter.rows == 2 * 4


def test_threshold_drops_full_forwards_within_tolerance():
    """12 UniPC steps with CFG on a random model (its first-block residual changes by 0.2–0.5 per step):
    threshold 0.2 skips a few forwards (counted on the last block) with a max abs error within 1 % of the
    output's range; threshold 0.4 skips most and stays within 10 %."""
    m = tiny_model(seed=3)
    pos, neg = texts(2)
    kw = dict(seed=9, steps=12, cfg=4.0, shift=5.0, solver="unipc")
    plain = pipeline.sample_video(m, pos, neg, Z, **kw)
    results = {}
    for threshold in (0.2, 0.4):
        counter = RowCounter(m)
        cache = StepCache(threshold)
        out = pipeline.sample_video(m, pos, neg, Z, step_cache=cache, **kw)
        counter.close()
        assert cache.calls == 24 and counter.rows == cache.full
        err = (out - plain).abs().max().item()
        results[threshold] = (cache.full, err)
        # both streams were decided separately (one state each, skips counted per stream)
        assert set(cache.streams) == {"cond", "uncond"}
    full_lo, err_lo = results[0.2]
    full_hi, err_hi = results[0.4]
    scale = (plain.max() - plain.min()).item()
    assert full_lo < 24, results
    assert full_hi <= 12 and full_hi < full_lo, results
    assert 0 < err_lo <= 0.01 * scale, (results, scale)
    assert err_hi <= 0.10 * scale, (results, scale)


class FakeModel:
    """embed/run_blocks/finish with scripted residuals: block 0 adds r1 = s_row · base (s scripted per call),
    blocks 1.. add 100·(k + 1) where k counts their calls; finish is the identity."""

    def __init__(self, scales):
        self.scales = list(scales)
        self.base = torch.linspace(1.0, 2.0, 6).view(1, 2, 3)
        self.rest_calls = []  # rows that ran blocks 1..

    def embed(self, x, t, context, **kw):
        return BlockInputs(x, x[:, 0], x, x, None, None, None, x.shape[1], 1.0, torch.float32, "sdpa", None, None)

    def run_blocks(self, inp, x, start=0, end=None):
        if (start, end) == (0, 1):
            s = torch.tensor(self.scales.pop(0), dtype=torch.float32).view(-1, 1, 1)
            return x + s * self.base
        assert (start, end) == (1, None)
        self.rest_calls.append(x.shape[0])
        return x + 100.0 * len(self.rest_calls)

    def finish(self, inp, x):
        return x


def rel(a, b):
    return abs(a - b) / abs(b)


def test_skip_rule_on_a_fake_model():
    # row 0 changes by 5 %, 9 %, then 12 % against the last FULL step; row 1 by 30 % at once
    scales = [[1.0, 1.0], [1.05, 1.3], [1.09, 1.31], [1.12, 1.3]]
    fake = FakeModel(scales)
    cache = StepCache(0.1)
    x = torch.zeros(2, 2, 3)
    outs = [cache(fake, "s", x, None, None) for _ in range(4)]
    # call 1: warm-up, both rows run (rest = 100); call 2: row 0 (d=0.05) skips, row 1 (d=0.3) runs alone
    # (rest = 200); call 3: both skip; call 4: row 0 alone (rest = 300)
    assert fake.rest_calls == [2, 1, 1]
    d = [h[1] for h in cache.history]
    assert d[0] is None
    assert d[1] == pytest.approx([rel(1.05, 1.0), rel(1.3, 1.0)], rel=1e-5)
    # call 3: row 0 against call 1 (its last full step): 0.09 < 0.1 skips; row 1 against call 2: 0.008 skips
    assert d[2] == pytest.approx([rel(1.09, 1.0), rel(1.31, 1.3)], rel=1e-4)
    # call 4: row 0 reaches 12 % > 0.1 -> runs
    assert d[3][0] == pytest.approx(rel(1.12, 1.0), rel=1e-5)
    assert [h[2] for h in cache.history] == [[True, True], [False, True], [False, False], [True, False]]
    # reused rows: this step's block-0 output + blocks-1.. residual of that row's last full step
    assert torch.allclose(outs[1][0], 1.05 * fake.base[0] + 100.0)
    assert torch.allclose(outs[1][1], 1.3 * fake.base[0] + 200.0)   # ran (2nd rest call)
    assert torch.allclose(outs[2][0], 1.09 * fake.base[0] + 100.0)
    assert torch.allclose(outs[2][1], 1.31 * fake.base[0] + 200.0)  # reused its call-2 residual
    assert torch.allclose(outs[3][0], 1.12 * fake.base[0] + 300.0)  # ran (3rd rest call)
    assert torch.allclose(outs[3][1], 1.3 * fake.base[0] + 200.0)
    assert cache.calls == 8 and cache.full == 4 and cache.skipped == 4


def test_streams_are_separate_and_warmup_and_max_skips():
    fake = FakeModel([[1.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    cache = StepCache(0.5, warmup=2, max_skips=1)
    x = torch.zeros(1, 2, 3)
    for _ in range(3):
        cache(fake, "a", x, None, None)
    # stream a: 2 warm-up calls run, the 3rd (d = 0) skips
    assert fake.rest_calls == [1, 1]
    cache(fake, "b", x, None, None)  # a new stream has nothing to reuse: runs
    assert fake.rest_calls == [1, 1, 1]
    cache(fake, "a", x, None, None)  # max_skips=1: stream a skipped once already -> runs
    cache(fake, "a", x, None, None)  # and may skip again
    assert fake.rest_calls == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=">= 0"):
        StepCache(-0.1)


def test_cached_model_for_frame_guidance_keeps_three_streams():
    """long_video.wan_velocity_fn calls the model directly: CachedModel names each pass by its tensors, so
    cond / text-uncond / frame-uncond get their own states; a never-skipping cache equals the plain function."""
    m = tiny_model("i2v", seed=4, layers=3)
    pos, neg = texts(3)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    cache = StepCache(1e-30)
    kw = dict(cfg_scale=3.0, y=y, image_strength=0.0, frame_guidance=1.5)
    with torch.no_grad():
        ref = [long_video.wan_velocity_fn(m, pos, neg, **kw)(x, s) for s in (0.9, 0.7)]
        fn = long_video.wan_velocity_fn(CachedModel(m, cache), pos, neg, **kw)
        got = [fn(x, s) for s in (0.9, 0.7)]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert len(cache.streams) == 3 and cache.calls == 6


def test_row_subset_of_the_blocks_equals_the_full_batch():
    """The partial-batch path (BlockInputs.rows) on the real model: blocks 1.. on one row of a batch of 3 give
    that row of the full batch's result (i2v: y, CLIP image context and per-row timesteps all sliced)."""
    m = tiny_model("i2v", seed=6, layers=3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 16, 2, 4, 6, generator=g)
    y = torch.randn(3, 20, 2, 4, 6, generator=g)
    clip = torch.randn(3, 3, 8, generator=g)
    ctx = torch.randn(3, 5, 16, generator=g)
    t = torch.tensor([900, 500, 100])
    with torch.no_grad():
        inp = m.embed(x, t, ctx, clip_fea=clip, y=y)
        h1 = m.run_blocks(inp, inp.x, 0, 1)
        full = m.run_blocks(inp, h1, 1)
        idx = torch.tensor([2, 0])
        part = m.run_blocks(inp.rows(idx), h1[idx], 1)
        assert torch.allclose(part, full[idx], atol=1e-5, rtol=1e-5)
        assert torch.equal(m.finish(inp, full), m(x, t, ctx, clip_fea=clip, y=y))


def test_cached_model_batched_frame_guidance():
    """wan_velocity_fn(batched=True) makes one call per step with rows [cond, text-uncond, frame-uncond]: with
    CachedModel(stream_of="batch") a never-skipping cache equals the plain batched function bit for bit, and a
    threshold between the rows' distances reuses some rows while running the others."""
    m = tiny_model("i2v", seed=7, layers=3)
    pos, neg = texts(5)
    g = torch.Generator().manual_seed(7)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    kw = dict(cfg_scale=3.0, y=y, image_strength=0.0, frame_guidance=1.5, batched=True)
    sigmas = (0.9, 0.85, 0.8)
    with torch.no_grad():
        ref = [long_video.wan_velocity_fn(m, pos, neg, **kw)(x, s) for s in sigmas]
        never = StepCache(1e-30)
        fn = long_video.wan_velocity_fn(CachedModel(m, never, stream_of=lambda *a: "batch"), pos, neg, **kw)
        got = [fn(x, s) for s in sigmas]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert list(never.streams) == ["batch"] and never.calls == 9 and never.full == 9
    d = never.history[1][1]  # the three rows' distances at the 2nd step
    assert len(d) == 3
    lo, hi = min(d), max(d)
    assert hi - lo > 1e-6  # the frame-uncond row moves differently from the two text rows
    cache = StepCache((lo + hi) / 2)
    with torch.no_grad():
        fn = long_video.wan_velocity_fn(CachedModel(m, cache, stream_of=lambda *a: "batch"), pos, neg, **kw)
        fn(x, sigmas[0])
        fn(x, sigmas[1])
    assert cache.history[1][2] == [v >= (lo + hi) / 2 for v in d]
    assert 3 < cache.full < 6
