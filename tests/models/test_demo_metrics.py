"""The demo measurement code is the oracle of the demo CI tests: check it on rendered ground truth."""

import torch
import torch.nn.functional as F

from models.demo import captions as C
from models.demo import metrics, world


def _captions(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [C.random_caption(g) for _ in range(n)]


def _degrade(video, seed):
    """Blur and noise, roughly what a small VAE does to a clip."""
    x = video.permute(0, 3, 1, 2)
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    k2 = (k[:, None] * k[None]).expand(3, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    g = torch.Generator().manual_seed(seed)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def test_adherence_on_rendered_clips_is_perfect():
    for i, cap in enumerate(_captions(60, seed=11)):
        v = world.render(cap, 17, seed=100 + i)
        a = metrics.adherence(cap.text(), v)
        assert a["all"] and a["background"], (cap.text(), a)


def test_adherence_survives_blur_and_noise_and_small_size():
    for i, cap in enumerate(_captions(30, seed=12)):
        a = metrics.adherence(cap, _degrade(world.render(cap, 17, seed=i), i))
        assert a["all"] and a["background"], (cap.text(), a)
        b = metrics.adherence(cap, world.render(cap, 17, size=32, seed=i))
        assert b["all"], (cap.text(), b)


def test_wrong_caption_is_rejected():
    cap = C.parse("a red circle moving left quickly on a black background")
    v = world.render(cap, 17, seed=0)
    for other, key in [("a blue circle moving left quickly on a black background", "colour"),
                       ("a red square moving left quickly on a black background", "shape"),
                       ("a red triangle moving left quickly on a black background", "shape"),
                       ("a red circle moving right quickly on a black background", "motion"),
                       ("a red circle moving up quickly on a black background", "motion"),
                       ("a red circle growing quickly on a black background", "motion")]:
        a = metrics.adherence(other, v)
        assert not a[key] and not a["all"], other


def test_centroid_track_matches_ground_truth():
    cap = "a magenta square moving down slowly on a gray background"
    v, st = world.render(cap, 33, seed=5, return_state=True)
    tr = metrics.track(v)
    # pixel centres are at integer coordinates + 0.5 in the renderer's continuous frame
    torch.testing.assert_close(tr["cx"].double() + 0.5, st["cx"], atol=0.3, rtol=0)
    torch.testing.assert_close(tr["cy"].double() + 0.5, st["cy"], atol=0.3, rtol=0)
    area = (2 * 0.85 * st["r"][0]) ** 2
    assert abs(float(tr["area"][0]) - float(area)) / float(area) < 0.15


def test_flipped_clip_reads_the_opposite_direction():
    cap = "a green triangle moving left quickly on a white background"
    v = world.render(cap, 17, seed=9)
    assert metrics.summarise(v)["direction"] == "left"
    assert metrics.summarise(v.flip(2))["direction"] == "right"
    assert metrics.summarise(v.transpose(1, 2))["direction"] == "up"
    assert metrics.summarise(v[:1].expand(17, -1, -1, -1))["direction"] == "still"


def test_lost_frame():
    cap = "a yellow circle moving right slowly on a black background"
    v = world.render(cap, 17, seed=1).clone()
    assert metrics.lost_frame(v, cap) is None
    v[11:] = torch.tensor(world.BACKGROUND_RGB["black"])
    assert metrics.lost_frame(v, cap) == 11
    w = world.render(cap, 17, seed=1).clone()
    w[7:] = world.render("a blue circle moving right slowly on a black background", 17, seed=1)[7:]
    assert metrics.lost_frame(w, cap) == 7
    assert metrics.lost_frame(w) is None  # present throughout; colour only checked with a caption


def test_segment_drift_localises_a_tint():
    cap = "a red square moving up quickly on a gray background"
    v = world.long_clip(cap, 8, 17, seed=3).clone()
    rows = metrics.segment_drift(v, cap, 17)
    assert len(rows) == 8
    assert all(r["colour_error"] < 1e-3 and r["background_error"] < 1e-3 for r in rows)
    v[16 * 5 + 1: 16 * 6] = (v[16 * 5 + 1: 16 * 6] * torch.tensor([0.6, 1.0, 1.0])).clamp(0, 1)
    rows = metrics.segment_drift(v, cap, 17)
    errs = [r["colour_error"] for r in rows]
    assert errs[5] > 0.2 and max(errs[:5] + errs[6:]) < 0.05
    assert rows[5]["background_error"] > 0.1 and rows[4]["background_error"] < 1e-3


def test_growing_and_turning_read_back():
    g = world.render("a blue triangle growing quickly on a black background", 17, seed=2)
    s = metrics.summarise(g)
    assert s["size_trend"] == "growing" and s["area_ratio"] > 1.25 and s["shape"] == "triangle"
    t = world.render("a red circle turning green slowly on a white background", 17, seed=2)
    s = metrics.summarise(t)
    assert (s["first_colour"], s["last_colour"]) == ("red", "green")


def test_consistency_and_psnr():
    cap = "a cyan circle moving left slowly on a black background"
    v = world.render(cap, 17, seed=4)
    c = metrics.consistency(v)
    assert c["consistent_share"] == 1.0 and c["area_cv"] < 0.05 and c["colour_shift"] < 1e-4
    w = v.clone()
    w[9:] = world.render("a red square moving left slowly on a black background", 17, seed=4)[9:]
    assert metrics.consistency(w)["consistent_share"] == 9 / 17
    noise = torch.full_like(v, 0.1)
    assert abs(metrics.psnr(v, (v + noise)) - 20.0) < 1e-3
    assert metrics.psnr(v, v) == float("inf")


def test_bad_input_is_refused():
    import pytest
    with pytest.raises(ValueError, match="T, H, W, 3"):
        metrics.track(torch.zeros(3, 64, 64))
