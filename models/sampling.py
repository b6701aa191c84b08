"""Flow-matching sampling for Wan, as small pure functions in the k-diffusion style.

Conventions (REFERENCE.md §3):

* Flow matching: x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity v ≈ ε − x0, so the clean
  estimate is x0 = x − σ·v.
* A solver is ``sample_<name>(velocity_fn, x, sigmas, callback=None)`` where ``velocity_fn(x, sigma)``
  returns v for the state ``x`` at noise level ``sigma`` (a Python float). ``sigmas`` is the full grid
  including the final 0 (as returned by :func:`wan_sigmas`). The model's integer timestep for a σ is
  :func:`timestep` (t = int64(σ·1000), truncated, as the reference scheduler).
* ``callback`` (optional) is called after every step with a dict
  ``{"i", "x", "sigma", "sigma_next", "denoised", "total"}`` where ``x`` is the new state and ``denoised``
  the x0 estimate of the step (for previews and progress bars).
* The state is kept in float32 (float64 if the input is float64) whatever dtype the model returns.

Nothing here imports ComfyUI.
"""
import math

import numpy as np
import torch

SOLVERS = ("unipc", "euler", "dpmpp_2m")
NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------------------------- grid

def shift_sigmas(sigmas, shift):
    """σ' = s·σ / (1 + (s − 1)·σ) (works on floats, numpy arrays and tensors)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (Wan uses 3 to 16; 5 is the reference default), got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _base_grid(steps, solver):
    if solver in ("unipc", "euler"):
        # Reference FlowUniPC: σ_max = 0.999, σ_min = 0, N points without the end, then a final 0.
        return np.linspace(0.999, 0.0, steps + 1)[:-1]
    if solver == "dpmpp_2m":
        # Reference dpm++ path: starts at exactly 1.0.
        return np.linspace(1.0, 0.0, steps + 1)[:steps]
    raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")


def wan_sigmas(steps, shift, solver="unipc", denoise=1.0):
    """The Wan σ grid: ``steps + 1`` values (float64 tensor), shifted, ending with 0.

    UniPC / Euler: shift(linspace(0.999, 0, N+1)[:-1]) then 0; DPM++ 2M: shift(linspace(1, 0, N+1)[:N])
    then 0. ``denoise < 1`` (video-to-video) follows ComfyUI's KSampler: the grid is built for
    ``int(steps / denoise)`` steps and its last ``steps`` steps are kept, so ``steps`` model evaluations
    still run, starting from a lower noise level.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if not (0.0 < denoise <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise}; use 1.0 for text-to-video")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    total = steps if denoise >= 1.0 else max(steps, int(steps / denoise))
    grid = shift_sigmas(_base_grid(total, solver), float(shift))
    grid = np.concatenate([grid, [0.0]])[-(steps + 1):]
    return torch.from_numpy(grid.astype(np.float64))


def timestep(sigma):
    """The model's integer timestep for one σ: int64(σ·1000), truncated like the reference."""
    return int(np.float64(float(sigma)) * NUM_TRAIN_TIMESTEPS)


def timesteps(sigmas):
    """Integer timesteps (int64 tensor) of every model evaluation of a grid, i.e. of ``sigmas[:-1]``."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    return (s[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64)


# ---------------------------------------------------------------------------------------------- noise

def seeded_noise(shape, seed, dtype=torch.float32):
    """Standard normal noise from a CPU generator: the same tensor for the same seed on every device
    (move it with ``.to(device)``). Seeds in [0, 2**64 − 1] as ComfyUI's seed widget."""
    seed = int(seed)
    if not (0 <= seed <= 0xFFFF_FFFF_FFFF_FFFF):
        raise ValueError(f"seed must be in [0, 2**64-1], got {seed}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)


def noise_latent(x0, noise, sigma):
    """Flow-matching forward process x_σ = (1 − σ)·x0 + σ·ε (video-to-video start, denoise < 1)."""
    sigma = float(sigma)
    return (1.0 - sigma) * x0 + sigma * noise.to(device=x0.device, dtype=x0.dtype)


def cfg(v_cond, v_uncond, scale):
    """Classifier-free guidance: v = v_u + g·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


# -------------------------------------------------------------------------------------------- solvers

def _state(x):
    return x.to(torch.float64) if x.dtype == torch.float64 else x.to(torch.float32)


def _sigma_list(sigmas):
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    if len(s) < 2:
        raise ValueError(f"sigmas must hold at least 2 values (start and final 0), got {len(s)}")
    for a, b in zip(s, s[1:]):
        if not b < a:
            raise ValueError(f"sigmas must be strictly decreasing, got {s}")
    if not (0.0 <= s[-1] and s[0] <= 1.0):
        raise ValueError(f"sigmas must lie in [0, 1] for flow matching, got {s[0]} … {s[-1]}")
    return s


def _lambda(sigma):
    """log-SNR λ = log(1 − σ) − log σ (−inf at σ = 1, +inf at σ = 0)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _report(callback, i, x, s, s_next, denoised, total):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised, "total": total})


def _velocity(velocity_fn, x, sigma):
    return velocity_fn(x, sigma).to(x.dtype)


def sample_euler(velocity_fn, x, sigmas, callback=None):
    """Euler on the flow ODE: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i)."""
    s = _sigma_list(sigmas)
    x = _state(x)
    n = len(s) - 1
    for i in range(n):
        v = _velocity(velocity_fn, x, s[i])
        denoised = x - s[i] * v
        x = x + (s[i + 1] - s[i]) * v
        _report(callback, i, x, s[i], s[i + 1], denoised, n)
    return x


def sample_dpmpp_2m(velocity_fn, x, sigmas, callback=None):
    """DPM-Solver++(2M), midpoint form, data prediction, in the flow parameterisation (α = 1 − σ).

    First step and the final step (to σ = 0) are first order (lower-order final); the rest second order.
    σ = 1 at the start (the reference dpm++ grid) is handled as the limit λ = −∞.
    """
    s = _sigma_list(sigmas)
    x = _state(x)
    n = len(s) - 1
    prev_x0 = None
    for i in range(n):
        v = _velocity(velocity_fn, x, s[i])
        x0 = x - s[i] * v
        s_t, s_0 = s[i + 1], s[i]
        a_t = 1.0 - s_t
        lam_t, lam_0 = _lambda(s_t), _lambda(s_0)
        h = lam_t - lam_0  # > 0
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # e^{-h} − 1
        ratio = s_t / s_0
        first_order = prev_x0 is None or i == n - 1
        if first_order:
            x_next = ratio * x - (a_t * phi) * x0
        else:
            lam_1 = _lambda(s[i - 1])
            h_0 = lam_0 - lam_1
            inv_r0 = h / h_0 if math.isfinite(h_0) else 0.0
            d1 = inv_r0 * (x0 - prev_x0)
            x_next = ratio * x - (a_t * phi) * x0 - 0.5 * (a_t * phi) * d1
        prev_x0 = x0
        x = x_next
        _report(callback, i, x, s[i], s[i + 1], x0, n)
    return x


def sample_unipc(velocity_fn, x, sigmas, callback=None):
    """UniPC, B(h) = e^{−h} − 1 ("bh2"), order 2, x0 prediction, lower-order final (the reference's default).

    Step i: evaluate m_i = x0(x_i); if i > 0 correct x_i with UniC using m_i (the model output is not
    re-evaluated on the corrected state); then predict x_{i+1} with UniP of order min(2, i+1, N−i).
    The last step lands on σ = 0 (x_N = m_{N−1}).
    """
    s = _sigma_list(sigmas)
    if s[0] >= 1.0:
        s[0] = 1.0 - 1e-6  # as diffusers: UniPC needs a finite log-SNR at the start
    x = _state(x)
    n = len(s) - 1
    ms = []          # last model outputs (x0 estimates), newest last
    last_x = None    # the state before the last predictor
    last_order = None
    for i in range(n):
        v = _velocity(velocity_fn, x, s[i])
        m = x - s[i] * v
        if i > 0:
            x = _unic(x_prev=last_x, m_t=m, ms=ms, s_prev=s[i - 1], s_t=s[i],
                      s_prev2=s[i - 2] if i >= 2 else None, order=last_order)
        ms = (ms + [m])[-2:]
        order = min(2, n - i, i + 1)
        last_x = x
        x = _unip(x, ms, s_0=s[i], s_t=s[i + 1], s_1=s[i - 1] if i >= 1 else None, order=order)
        last_order = order
        _report(callback, i, x, s[i], s[i + 1], m, n)
    return x


def _unip(x, ms, s_0, s_t, s_1, order):
    m0 = ms[-1]
    a_t = 1.0 - s_t
    lam_t, lam_0 = _lambda(s_t), _lambda(s_0)
    h = lam_t - lam_0
    hh = -h
    h_phi_1 = math.expm1(hh) if math.isfinite(hh) else -1.0
    b_h = h_phi_1
    x_t = (s_t / s_0) * x - (a_t * h_phi_1) * m0
    if order == 2:
        r = (_lambda(s_1) - lam_0) / h
        d1 = (ms[-2] - m0) / r
        x_t = x_t - (a_t * b_h * 0.5) * d1
    return x_t


def _unic(x_prev, m_t, ms, s_prev, s_t, s_prev2, order):
    """UniC corrector of the state at σ_t (reached from x_prev at σ_prev) with the new model output m_t."""
    m0 = ms[-1]
    a_t = 1.0 - s_t
    lam_t, lam_0 = _lambda(s_t), _lambda(s_prev)
    h = lam_t - lam_0
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    x_t = (s_t / s_prev) * x_prev - (a_t * h_phi_1) * m0
    if order == 1:
        rho_c = [0.5]
        d1s = []
    else:
        r1 = (_lambda(s_prev2) - lam_0) / h
        # b_k = h·φ_{k+1}(h)·k! / B(h) as in UniPC; R = [[1, 1], [r1, 1]].
        h_phi_k = h_phi_1 / hh - 1.0
        b1 = h_phi_k / b_h
        h_phi_k2 = h_phi_k / hh - 1.0 / 2.0
        b2 = h_phi_k2 * 2.0 / b_h
        rho_c = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([b1, b2])).tolist()
        d1s = [(ms[-2] - m0) / r1]
    corr = 0.0
    for rho, d in zip(rho_c[:-1], d1s):
        corr = corr + rho * d
    return x_t - (a_t * b_h) * (corr + rho_c[-1] * (m_t - m0))


_SOLVER_FNS = {"unipc": sample_unipc, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def sample(velocity_fn, x, sigmas, solver="unipc", callback=None):
    """Run ``solver`` ('unipc', 'euler' or 'dpmpp_2m') over ``sigmas`` from the state ``x``.

    ``x`` must already be at noise level ``sigmas[0]`` (pure noise for text-to-video; use
    :func:`noise_latent` for denoise < 1).
    """
    fn = _SOLVER_FNS.get(solver)
    if fn is None:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return fn(velocity_fn, x, sigmas, callback=callback)
