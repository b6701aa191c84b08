"""Sliding context windows: coverage, blend weights, and the windowed UNet run."""
import itertools

import pytest
import torch

from models.animatediff import context
from models.animatediff.motion_module import FrameState

CASES = list(itertools.product([1, 7, 16, 17, 33, 64, 100], [8, 16], [0, 2, 4, 7], [False, True], context.FUSE_METHODS))


@pytest.mark.parametrize("frames,length,overlap,loop,method", CASES)
def test_every_frame_covered_and_weights_sum_to_one(frames, length, overlap, loop, method):
    p = context.plan(frames, length, overlap, loop, method)
    total = torch.zeros(frames)
    seen = torch.zeros(frames, dtype=torch.long)
    for window, w in p:
        assert len(window) == min(length, frames)
        assert len(set(window)) == len(window)
        assert all(0 <= f < frames for f in window)
        assert bool((w > 0).all())
        total.index_add_(0, torch.tensor(window), w)
        seen[torch.tensor(window)] += 1
    assert bool((seen >= 1).all())
    assert torch.allclose(total, torch.ones(frames), atol=1e-6)
    if frames > length:
        # windows are contiguous in time (modulo the clip length when the loop is closed)
        for window, _ in p:
            steps = [(b - a) % frames for a, b in zip(window, window[1:])]
            assert steps == [1] * (len(window) - 1)
            if not loop:
                assert window[-1] - window[0] == length - 1


def test_window_layout():
    assert context.windows(10, 16, 4) == [list(range(10))]
    assert context.windows(24, 16, 4) == [list(range(0, 16)), list(range(8, 24))]
    assert context.windows(20, 16, 4, closed_loop=True) == [list(range(16)), list(range(12, 20)) + list(range(8))]
    # overlap is honoured: consecutive windows share at least `overlap` frames
    w = context.windows(64, 16, 4)
    for a, b in zip(w, w[1:]):
        assert len(set(a) & set(b)) >= 4


def test_linear_and_pyramid_shapes():
    w = context.window_weights(list(range(8, 24)), 64, "linear", overlap=4)
    assert torch.allclose(w[:4], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert torch.all(w[4:12] == 1)
    first = context.window_weights(list(range(16)), 64, "linear", overlap=4)
    assert first[0] == 1  # the clip's first frame is not faded out
    p = context.window_weights(list(range(16)), 64, "pyramid")
    assert p.argmax() in (7, 8) and p[0] == p[-1] and p[0] < p[7]


def test_bad_options():
    with pytest.raises(ValueError, match="context_overlap"):
        context.windows(32, 16, 16)
    with pytest.raises(ValueError, match="fuse method"):
        context.window_weights([0, 1], 4, "gauss")


def test_run_in_windows_matches_per_window_oracle():
    """The fused result equals Σ_w weight·f(window) computed independently, per chunk."""
    frames, chunks, length, overlap = 20, 2, 8, 3
    x = torch.randn(chunks * frames, 3, 2, 2)
    t = torch.rand(chunks * frames)
    cross = torch.randn(chunks * frames, 5, 4)
    state = FrameState()
    calls = []

    def unet(xx, tt, cc):
        f = state.frames
        calls.append(f)
        assert cc["c_crossattn"].shape[0] == xx.shape[0] == tt.shape[0] == chunks * f
        assert cc["transformer_options"]["sigmas"].shape[0] == chunks * f
        # a function that mixes frames within a chunk: frame output = x + mean over the window's frames
        v = xx.reshape(chunks, f, *xx.shape[1:])
        return (v + v.mean(dim=1, keepdim=True) * tt.reshape(chunks, f, 1, 1, 1)).reshape(xx.shape) + cc["c_crossattn"][:, :1, :1, None]

    c = {"c_crossattn": cross, "transformer_options": {"sigmas": t, "cond_or_uncond": [1, 0]}, "control": None}
    out = context.run(unet, x, t, c, chunks, state, context_length=length, overlap=overlap, method="pyramid")
    assert state.frames is None
    ref = torch.zeros_like(x)
    for window, w in context.plan(frames, length, overlap, False, "pyramid"):
        for k in range(chunks):
            idx = torch.tensor([k * frames + f for f in window])
            v = x[idx]
            y = v + v.mean(dim=0, keepdim=True) * t[idx].reshape(-1, 1, 1, 1) + cross[idx][:, :1, :1, None]
            ref[idx] += y * w.reshape(-1, 1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert calls == [length] * len(context.windows(frames, length, overlap))


def test_short_clip_is_one_call_and_pe_limit():
    state = FrameState()
    x = torch.randn(2 * 10, 1)
    seen = []
    out = context.run(lambda a, b, c: seen.append(state.frames) or a * 2, x, torch.zeros(20), {}, 2, state, 16, 4)
    assert seen == [10] and torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="positional encoding length 32"):
        context.run(lambda a, b, c: a, torch.randn(40, 1), torch.zeros(40), {}, 1, state, 0, 0, pe_length=32)
    with pytest.raises(ValueError, match="not 2 equal"):
        context.run(lambda a, b, c: a, torch.randn(5, 1), torch.zeros(5), {}, 2, state)
