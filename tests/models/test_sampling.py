"""Sampler checks against the reference formulas (REFERENCE §3) and diffusers 0.42.1's schedulers."""
import numpy as np
import pytest
import torch

from models import sampling

diffusers = pytest.importorskip("diffusers")


def fake_velocity(target):
    """A deterministic, non-linear stand-in for the DiT: depends on the state and on σ."""
    def fn(x, sigma):
        sigma = float(sigma)
        return torch.tanh(x) * (0.5 + sigma) + torch.cos(3.0 * x) * sigma + (1.0 - sigma) * target - 0.3 * x
    return fn


def _reference_grid(steps, shift, start):
    """Written out from REFERENCE §3 independently of models.sampling."""
    if start == 0.999:
        base = np.linspace(0.999, 0.0, steps + 1)[:-1]
    else:
        base = np.linspace(1.0, 0.0, steps + 1)[:steps]
    shifted = shift * base / (1 + (shift - 1) * base)
    return np.concatenate([shifted, [0.0]])


def test_grid_50_steps_shift5_matches_reference_formula():
    sig = sampling.wan_sigmas(50, 5.0, "unipc")
    ref = _reference_grid(50, 5.0, 0.999)
    assert sig.shape == (51,)
    assert float(sig[-1]) == 0.0
    np.testing.assert_allclose(sig.numpy(), ref, rtol=0, atol=1e-15)
    t = sampling.timesteps(sig)
    ref_t = (ref[:-1] * 1000).astype(np.int64)
    assert t.dtype == torch.int64 and t.shape == (50,)
    assert t.tolist() == ref_t.tolist()
    # The documented head of the sequence, as a sanity anchor derived from the same formula.
    assert t[:3].tolist() == [int(v * 1000) for v in ref[:3]]
    assert t[0].item() == 999 and t[1].item() == 995 and t[2].item() == 991
    assert [sampling.timestep(v) for v in sig[:-1]] == ref_t.tolist()


def test_grid_dpmpp_starts_at_one_and_euler_shares_unipc():
    d = sampling.wan_sigmas(20, 16.0, "dpmpp_2m")
    np.testing.assert_allclose(d.numpy(), _reference_grid(20, 16.0, 1.0), atol=1e-15)
    assert float(d[0]) == 1.0
    assert torch.equal(sampling.wan_sigmas(20, 3.0, "euler"), sampling.wan_sigmas(20, 3.0, "unipc"))


def test_grid_matches_diffusers_unipc_sigmas_and_timesteps():
    from diffusers import UniPCMultistepScheduler
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                  solver_order=2)
    sch.set_timesteps(sigmas=np.linspace(0.999, 0, 51)[:-1])
    sig = sampling.wan_sigmas(50, 5.0)
    np.testing.assert_allclose(sig.numpy(), sch.sigmas.numpy().astype(np.float64), atol=1e-7)
    assert sampling.timesteps(sig).tolist() == sch.timesteps.tolist()


def test_denoise_keeps_the_last_steps_of_a_longer_grid():
    full = sampling.wan_sigmas(20, 5.0)
    part = sampling.wan_sigmas(10, 5.0, denoise=0.5)
    assert part.shape == (11,)
    assert torch.equal(part, full[-11:])
    assert float(part[0]) < 0.999
    with pytest.raises(ValueError, match="denoise"):
        sampling.wan_sigmas(10, 5.0, denoise=0.0)
    with pytest.raises(ValueError, match="solver"):
        sampling.wan_sigmas(10, 5.0, solver="heun")


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    out = sampling.shift_sigmas(s, 3.0)
    assert torch.allclose(out, 3 * s / (1 + 2 * s))
    assert out[0] == 0 and out[-1] == 1


@pytest.mark.parametrize("steps,shift", [(12, 5.0), (7, 3.0), (30, 8.0)])
def test_unipc_matches_diffusers(steps, shift):
    from diffusers import UniPCMultistepScheduler
    torch.manual_seed(0)
    x_init = torch.randn(1, 4, 3, 4, 5)
    target = torch.randn(1, 4, 3, 4, 5)
    vel = fake_velocity(target)

    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  solver_order=2)
    sch.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
    assert sch.config.solver_type == "bh2" and sch.config.lower_order_final and sch.config.predict_x0
    x = x_init.clone()
    for i, t in enumerate(sch.timesteps):
        v = vel(x, float(sch.sigmas[i]))
        x = sch.step(v, t, x).prev_sample

    seen = []
    ours = sampling.sample(vel, x_init.clone(), sampling.wan_sigmas(steps, shift), "unipc",
                           callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(steps))
    diff = (ours - x).abs().max().item()
    print(f"max abs diff {diff:.3e}")
    assert diff <= 1e-5, diff
    # The comparison is not vacuous: a solver without the corrector lands elsewhere.
    euler = sampling.sample(vel, x_init.clone(), sampling.wan_sigmas(steps, shift), "euler")
    assert (euler - x).abs().max().item() > 1e-3


def test_euler_is_the_formula():
    torch.manual_seed(1)
    x_init = torch.randn(2, 3, 2, 3)
    vel = fake_velocity(torch.randn(2, 3, 2, 3))
    sig = sampling.wan_sigmas(9, 5.0, "euler")
    x = x_init.clone()
    s = sig.tolist()
    for i in range(9):
        x = x + (s[i + 1] - s[i]) * vel(x, s[i])
    ours = sampling.sample_euler(vel, x_init.clone(), sig)
    assert torch.equal(ours, x)


@pytest.mark.parametrize("steps,shift,denoise", [(10, 5.0, 1.0), (20, 16.0, 1.0), (8, 5.0, 0.6)])
def test_dpmpp_2m_matches_diffusers_with_the_wan_grid(steps, shift, denoise):
    """diffusers' DPMSolverMultistepScheduler (flow prediction, dpmsolver++, midpoint, order 2, lower-order
    final) driven on the Wan dpm++ grid by overwriting its σ table (its own flow grid starts at 0.999)."""
    from diffusers import DPMSolverMultistepScheduler
    torch.manual_seed(2)
    x_init = torch.randn(1, 4, 2, 3, 3)
    vel = fake_velocity(torch.randn(1, 4, 2, 3, 3))
    sig = sampling.wan_sigmas(steps, shift, "dpmpp_2m", denoise=denoise)

    sch = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                      solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                      lower_order_final=True, final_sigmas_type="zero")
    sch.set_timesteps(steps)
    sch.sigmas = sig.to(torch.float32)
    sch.set_begin_index(0)
    x = x_init.clone()
    for i in range(steps):
        v = vel(x, float(sch.sigmas[i]))
        x = sch.step(v, sch.timesteps[i], x).prev_sample
    assert torch.isfinite(x).all()
    ours = sampling.sample(vel, x_init.clone(), sig, "dpmpp_2m")
    diff = (ours - x).abs().max().item()
    print(f"max abs diff {diff:.3e}")
    assert diff <= 1e-5, diff


def test_last_step_lands_on_x0_estimate():
    """Every solver's final step goes to σ = 0: the result is the last x0 estimate of a first-order step."""
    vel = fake_velocity(torch.ones(1, 2, 2))
    for solver in sampling.SOLVERS:
        got = []
        out = sampling.sample(vel, torch.randn(1, 2, 2), sampling.wan_sigmas(5, 5.0, solver), solver,
                              callback=lambda d: got.append(d))
        assert got[-1]["sigma_next"] == 0.0
        if solver != "unipc":  # UniPC's last state is corrected before its final predictor
            assert torch.allclose(out, got[-1]["denoised"], atol=1e-6)


def test_seeded_noise_reproducible_and_device_independent():
    a = sampling.seeded_noise((1, 16, 2, 4, 4), 1234)
    b = sampling.seeded_noise((1, 16, 2, 4, 4), 1234)
    c = sampling.seeded_noise((1, 16, 2, 4, 4), 1235)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator("cpu").manual_seed(1234)
    assert torch.equal(a, torch.randn(1, 16, 2, 4, 4, generator=g))
    big = sampling.seeded_noise((2,), 2 ** 64 - 1)
    assert big.shape == (2,)
    with pytest.raises(ValueError, match="seed"):
        sampling.seeded_noise((2,), -1)


def test_cfg_and_noise_latent():
    vc, vu = torch.randn(3), torch.randn(3)
    assert torch.allclose(sampling.cfg(vc, vu, 5.0), vu + 5.0 * (vc - vu))
    assert torch.allclose(sampling.cfg(vc, vu, 1.0), vc, atol=1e-6)
    x0, eps = torch.randn(4), torch.randn(4)
    assert torch.allclose(sampling.noise_latent(x0, eps, 0.3), 0.7 * x0 + 0.3 * eps)


def test_bad_sigmas_rejected():
    vel = fake_velocity(torch.zeros(2))
    with pytest.raises(ValueError, match="decreasing"):
        sampling.sample(vel, torch.zeros(2), torch.tensor([0.5, 0.7, 0.0]), "euler")
    with pytest.raises(ValueError, match="solver"):
        sampling.sample(vel, torch.zeros(2), sampling.wan_sigmas(3, 5.0), "ddim")
