"""Spatial tiling around the streaming Wan VAE: blend weights, exactness of the single-tile path,
tile-major == time-major, a measured error bound against the untiled decode, auto mode + OOM fallback."""
import sys
from pathlib import Path

import pytest
import torch

from models import tiling
from models.wan import vae as wv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_wan_vae import randomize  # noqa: E402

CFG = dict(dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def model():
    return randomize(wv.WanVAE(**CFG).eval().requires_grad_(False), seed=5)


@pytest.fixture(scope="module")
def z():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 4, 2, 6, 9, generator=g)


@pytest.mark.parametrize("size,tile,overlap", [(9, 4, 2), (6, 4, 2), (30, 8, 3), (5, 5, 2), (17, 6, 1)])
def test_spans_cover_and_weights_sum_to_one(size, tile, overlap):
    spans = tiling.tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(e - s == min(tile, size) for s, e in spans)
    assert all(b[0] < a[1] - overlap + 1 for a, b in zip(spans, spans[1:]))  # overlap at least `overlap`
    ramps = tiling._ramps(spans, size, 8, "cpu")
    total = torch.zeros(size * 8, dtype=torch.float64)
    for (s, e), r in zip(spans, ramps):
        assert (r > 0).all()
        total[s * 8:e * 8] += r.double()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_single_tile_is_the_untiled_decode_bit_for_bit(model, z):
    with torch.inference_mode():
        full = model.decode(z)
        one = tiling.decode_tiled(model, z, (6, 9))
        streamed = torch.cat(list(tiling.iter_decode_tiled(model, z, (64, 64))), 2)
    assert torch.equal(one, full) and torch.equal(streamed, full)


def test_tiled_error_bound_and_orders_agree(model, z):
    with torch.inference_mode():
        full = model.decode(z)
        tiled = tiling.decode_tiled(model, z, (4, 5), overlap=2)
        streamed = torch.cat(list(tiling.iter_decode_tiled(model, z, (4, 5), overlap=2)), 2)
        no_overlap = tiling.decode_tiled(model, z, (3, 3), overlap=0)
    assert tiled.shape == full.shape == (1, 3, 5, 48, 72)
    assert torch.equal(tiled, streamed)  # tile-major and time-major do the same per-tile work
    err = (tiled - full).abs()
    err_hard = (no_overlap - full).abs()
    # Scale-free bound: the error of unrelated content (the frame against its mirror image) is what a
    # misplaced or unnormalised blend gives. Random weights mix space strongly (and the middle attention
    # is global per frame), so seams are far from invisible at this tiny tile; the real-size figure is
    # measured by bench/bench_vae.py.
    unrelated = (full - full.flip(-1)).abs().mean().item()
    assert err.mean().item() < 0.6 * unrelated
    assert err.mean().item() > 0  # tiles really cut the receptive field
    assert err.mean().item() < err_hard.mean().item()  # feathered overlap beats hard seams
    assert tiled.abs().max() <= 1.0


def test_tiles_carry_their_own_cache_exactly_in_time(model, z):
    """Each tile is causal and exact in time: decoding a latent prefix gives the prefix of the frames."""
    with torch.inference_mode():
        whole = tiling.decode_tiled(model, z, (4, 5), overlap=2)
        prefix = tiling.decode_tiled(model, z[:, :, :2], (4, 5), overlap=2)
    assert torch.equal(prefix, whole[:, :, :5])


def test_auto_tile_from_free_memory(model):
    per_px = tiling.decode_bytes_per_pixel(model)
    assert per_px > 0
    assert tiling.auto_tile(model, 6, 9, free_bytes=1 << 40) is None
    tile = tiling.auto_tile(model, 60, 90, free_bytes=int(per_px * 240 * 240 / 0.7))
    assert tile[0] == tile[1] and 28 <= tile[0] <= 30
    assert tile is not None and tile[0] < 60 and tile[1] < 90
    real = wv.build_wan_vae(device="meta", dtype=torch.bfloat16)
    # released VAE, bf16: a 480x832 frame needs a few GiB of caches and working memory
    need = tiling.decode_bytes_per_pixel(real) * 480 * 832
    assert 1.0 * 2 ** 30 < need < 4 * 2 ** 30


def test_oom_falls_back_to_smaller_tiles(model, z, monkeypatch):
    real_push = wv.WanDecoderStream.push

    def push(self, zz):  # pretend anything wider than 3 latent pixels does not fit
        if zz.shape[-1] > 3 or zz.shape[-2] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_push(self, zz)

    monkeypatch.setattr(wv.WanDecoderStream, "push", push)
    monkeypatch.setattr(tiling, "MIN_TILE", 2)
    tried = []
    with torch.inference_mode():
        got = tiling.decode_auto(model, z, tile=None, overlap=1, free_bytes=1 << 40, on_retry=tried.append)
        streamed = torch.cat(list(tiling.iter_decode_auto(model, z, tile=(6, 6), overlap=1)), 2)
        monkeypatch.setattr(wv.WanDecoderStream, "push", real_push)
        final = tried[-1]
        direct = tiling.decode_tiled(model, z, final, overlap=1)
    assert tried and max(final) <= 3
    assert torch.equal(got, direct)
    assert streamed.shape == got.shape


def test_non_oom_errors_are_not_swallowed(model, z, monkeypatch):
    def push(self, zz):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(wv.WanDecoderStream, "push", push)
    with pytest.raises(RuntimeError, match="something else"):
        tiling.decode_auto(model, z, tile=(4, 4))


def _video(t=5, h=48, w=72, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def test_tiled_encode_single_tile_exact_and_error_bound(model):
    x = _video()
    with torch.inference_mode():
        full = model.encode(x)
        one = tiling.encode_tiled(model, x, (6, 9))
        tiled = tiling.encode_tiled(model, x, (4, 5), overlap=2)
        src = lambda s, e, y0, y1, x0, x1: x[:, :, s:e, y0:y1, x0:x1]  # noqa: E731
        called = tiling.encode_tiled(model, src, (4, 5), overlap=2, shape=(1, 5, 48, 72))
        auto = tiling.encode_auto(model, x, free_bytes=1 << 40)
    assert torch.equal(one, full) and torch.equal(auto, full)
    assert torch.equal(called, tiled)
    assert tiled.shape == full.shape == (1, 4, 2, 6, 9)
    err = (tiled - full).abs().mean().item()
    unrelated = (full - full.flip(-1)).abs().mean().item()
    assert 0 < err < 0.6 * unrelated


def test_encode_oom_falls_back_to_smaller_tiles(model, monkeypatch):
    x = _video()
    real_push = wv.WanEncoderStream.push

    def push(self, frames):
        if frames.shape[-1] > 24 or frames.shape[-2] > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_push(self, frames)

    monkeypatch.setattr(wv.WanEncoderStream, "push", push)
    monkeypatch.setattr(tiling, "MIN_TILE", 2)
    tried = []
    with torch.inference_mode():
        got = tiling.encode_auto(model, x, overlap=1, free_bytes=1 << 40, on_retry=tried.append)
        monkeypatch.setattr(wv.WanEncoderStream, "push", real_push)
        direct = tiling.encode_tiled(model, x, tried[-1], overlap=1)
    assert tried and max(tried[-1]) <= 3
    assert torch.equal(got, direct)
