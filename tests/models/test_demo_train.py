"""The demo training script's VAE init and the bf16-autocast training path of the VAE's RMS norm."""
import torch

from models.demo import train as T
from models.wan.vae import RMS_norm, WanVAE


def test_per_frame_init_makes_the_video_vae_a_held_frame_image_vae():
    torch.manual_seed(0)
    vae = WanVAE(T.VAE_CONFIG)
    T.init_per_frame(vae)
    vae.eval()
    x = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        per_image = torch.cat([vae.encode(x[:, :, f:f + 1]) for f in (0, 4, 8, 12, 16)], 2)
        assert (z - per_image).abs().max() < 1e-4  # latent frame k holds pixel frame 4k alone
        y = T.decode_unclamped(vae, z)
        held = [T.decode_unclamped(vae, per_image[:, :, k:k + 1]) for k in range(5)]
    expected = torch.cat([held[0]] + [h.expand(-1, -1, 4, -1, -1) for h in held[1:]], 2)
    assert y.shape == x.shape
    assert (y - expected).abs().max() < 1e-4  # frames 4k-3..4k are the image decode of latent k
    assert y.abs().mean() > 0.05  # not a degenerate all-zero decoder


def test_random_init_is_not_per_frame():
    torch.manual_seed(0)
    vae = WanVAE(T.VAE_CONFIG).eval()
    x = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        alone = vae.encode(x[:, :, 4:5])
    assert (z[:, :, 1:] - alone).abs().max() > 1e-2


def test_rms_norm_half_precision_training_path_matches_inference_and_has_gradients():
    torch.manual_seed(1)
    norm = RMS_norm(8, images=False)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 3, 4, 4).to(torch.bfloat16)
    with torch.no_grad():
        ref = norm(x)
    xg = x.clone().requires_grad_(True)
    out = norm(xg)
    assert torch.equal(out, ref)
    out.float().square().sum().backward()
    assert norm.gamma.grad is not None and norm.gamma.grad.abs().sum() > 0
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run_budget(seconds, step_times, steps=100_000):
    clock, logs = FakeClock(), []
    budget = T.StepBudget(seconds, logs.append, "test", clock=clock)
    step = 0
    while step < steps:
        clock.t += step_times(step)
        step += 1
        steps = budget.fit(step, steps)
    return step, clock.t, logs


def test_step_budget_fits_the_cap_from_steps_after_the_warm_up():
    # 5 s warm-up steps (compile), then 0.1 s steps: 100 s cap -> about (100 - 50) / 0.1 more steps
    steps, elapsed, logs = run_budget(100.0, lambda i: 5.0 if i < T.WARMUP_STEPS else 0.1)
    assert abs(elapsed - 100.0) < 0.5 and steps > 500
    assert len(logs) == 1 and "100.0 ms/step" in logs[0]  # steady steps: no refit lowers it


def test_step_budget_refits_when_steps_get_slower_than_the_timed_ones():
    # timed at 0.1 s, then 0.2 s from step 40 on: the first fit alone would run ~1.8x over the cap
    steps, elapsed, logs = run_budget(100.0, lambda i: 0.1 if i < 40 else 0.2)
    assert elapsed <= 100.0 + 0.5, (steps, elapsed, logs)
    assert len(logs) >= 2  # the first fit and at least one lowering refit
    assert run_budget(0, lambda i: 0.1, steps=50)[0] == 50  # no cap: the step count stands


def test_latent_object_mask_marks_the_cells_the_object_covers_in_each_latent_frame():
    from models.demo import captions as C
    from models.demo import world
    cap = C.Caption("red", "square", "moving", "quickly", "black", direction="right")
    video, st = world.render(cap, 17, seed=3, return_state=True)
    clips = (video.permute(3, 0, 1, 2)[None] * 2 - 1)
    m = T.latent_object_mask(clips)
    assert m.shape == (1, 1, 5, 8, 8) and m.dtype == torch.uint8
    for k, frames in enumerate([[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]):
        want = torch.zeros(8, 8, dtype=torch.bool)
        for f in frames:
            px = (video[f] - video[f, :1, :1]).abs().sum(-1) > 0.1
            want |= px.view(8, 8, 8, 8).any(3).any(1)
        assert torch.equal(m[0, 0, k].bool(), want), k
    assert 0 < m.float().mean() < 0.5
    assert bool(m[0, 0, 4].bool().any() and not torch.equal(m[0, 0, 0], m[0, 0, 4]))  # it moved


def test_weighted_mse_is_plain_mse_at_weight_one_and_up_weights_the_marked_cells():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 5, 8, 8, generator=g), torch.randn(2, 16, 5, 8, 8, generator=g)
    ones = torch.ones(2, 1, 5, 8, 8)
    assert torch.allclose(T._weighted_mse(pred, target, ones), torch.nn.functional.mse_loss(pred, target))
    w = ones.clone()
    w[:, :, :, :2, :2] = 5.0
    err = (pred - target) ** 2
    marked, rest = err[:, :, :, :2, :2].sum(), err.sum() - err[:, :, :, :2, :2].sum()
    want = (5 * marked + rest) / (w.sum() * 16)
    assert torch.allclose(T._weighted_mse(pred, target, w), want)


def test_make_clips_bounce_share_renders_that_share_unsafe_and_keeps_the_rest_as_before():
    from models.demo import world
    caps, clips, bounce = T.make_clips(64, 17, 3, "cpu")
    caps_b, clips_b, bounce_b = T.make_clips(64, 17, 3, "cpu", bounce_share=0.5)
    assert not bounce.any() and 16 < int(bounce_b.sum()) < 48
    assert [c.text() for c in caps] == [c.text() for c in caps_b]
    assert torch.equal(clips[~bounce_b], clips_b[~bounce_b])  # the safe clips are unchanged
    assert not torch.equal(clips[bounce_b], clips_b[bounce_b])
    i = int(bounce_b.nonzero()[0])
    want = world.render_batch([caps[i]], 17, seeds=[render_seed(i)], safe=False)[0]
    got = (clips_b[i].float().permute(1, 2, 3, 0) + 1) / 2
    assert (got - want).abs().max() < 2e-3


def render_seed(i, n=64, seed=3):
    """The render seed make_clips gives clip i (its generator: n captions, then n seeds)."""
    from models.demo import captions as C
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        C.random_caption(gen)
    return torch.randint(2 ** 31 - 1, (n,), generator=gen).tolist()[i]


def test_weighted_mse_of_a_fully_dropped_batch_is_zero_not_nan():
    pred, target = torch.randn(2, 16, 1, 2, 2), torch.randn(2, 16, 1, 2, 2)
    assert float(T._weighted_mse(pred, target, torch.zeros(2, 1, 1, 2, 2))) == 0.0
