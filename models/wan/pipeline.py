"""The Wan sampling loop as plain functions (no ComfyUI): text-to-video, and image-to-video / known-frame
conditioning through the optional `y` / `clip_fea` arguments, so the I2V and long-video code reuse it.

    z_raw = sample_video(model, text, negative_text, latent_raw, seed=0, steps=50, cfg=5.0, shift=5.0)

Latents in and out are in RAW VAE space (ComfyUI's LATENT convention); the DiT works on the normalised
latent (`latent.normalize`). Flow matching as the reference: x starts as the seeded noise (denoise = 1)
or as (1 − σ0)·x0 + σ0·ε (denoise < 1), the model gets the integer timestep int(σ·1000), and CFG runs
two passes v = v_u + g·(v_c − v_u) (the same `y` / `clip_fea` in both; only the text differs).
"""
import torch

from .. import sampling
from . import latent as wan_latent
from .step_cache import as_step_cache


def text_tensor(cond, text_dim=4096, what="conditioning"):
    """Check a text embedding [B, L, D] (or [L, D]) and return it as [B, L, D] float32."""
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{what} must be a tensor of text embeddings, got {type(cond).__name__}")
    if cond.ndim == 2:
        cond = cond[None]
    if cond.ndim != 3 or cond.shape[-1] != text_dim:
        raise ValueError(
            f"{what} has shape {list(cond.shape)}, but a Wan model needs umT5-XXL text embeddings of width "
            f"{text_dim} ([1, L, {text_dim}]): encode the prompt with CLIPLoader(type='wan', "
            "umt5_xxl_*.safetensors) + CLIPTextEncode — an SD/SDXL/Flux CLIP gives the wrong width"
        )
    return cond


def make_velocity_fn(model, context, negative_context=None, cfg=5.0, y=None, clip_fea=None, image_strength=1.0,
                     t_offset=0, batch_cfg=False, step_cache=None):
    """velocity_fn(x, σ) -> v for `models.sampling.sample`, in the DiT's normalised space.

    context / negative_context: [B or 1, L, text_dim]; y [B or 1, 20, F, H, W] (DiT space) and clip_fea
    for I2V/FLF2V models; cfg == 1 skips the unconditional pass; batch_cfg runs both passes as one batch
    (faster on a GPU with memory to spare); step_cache: a models.wan.step_cache.StepCache (or a threshold;
    0 / None: off) — the "cond" and "uncond" passes are cached separately (batched: per row)."""
    text_dim = model.config.text_dim
    context = text_tensor(context, text_dim, "positive conditioning")
    use_cfg = float(cfg) != 1.0
    if use_cfg:
        if negative_context is None:
            raise ValueError("cfg != 1 needs a negative conditioning (or set cfg to 1)")
        negative_context = text_tensor(negative_context, text_dim, "negative conditioning")
    kw = dict(clip_fea=clip_fea, image_strength=image_strength, t_offset=t_offset)
    cache = as_step_cache(step_cache)

    def call(x, t, ctx, y_, stream="cond"):
        if cache is not None:
            return cache(model, stream, x, t, ctx, y=y_, **kw).float()
        return model(x, t, ctx, y=y_, **kw).float()

    def fn(x, sigma):
        t = torch.full((x.shape[0],), sampling.timestep(sigma), dtype=torch.int64, device=x.device)
        y_ = None if y is None else y.expand(x.shape[0], -1, -1, -1, -1)
        if not use_cfg:
            return call(x, t, context, y_)
        if batch_cfg:
            b = x.shape[0]
            ctx = torch.cat([_pad_rows(context, b), _pad_rows(negative_context, b)])
            v = call(torch.cat([x, x]), torch.cat([t, t]), ctx, None if y_ is None else torch.cat([y_, y_]), "cfg_batch")
            if clip_fea is not None and clip_fea.shape[0] not in (1, 2 * b):
                raise ValueError("batch_cfg needs clip_fea with batch 1")
            return sampling.cfg(v[:b], v[b:], cfg)
        return sampling.cfg(call(x, t, context, y_, "cond"), call(x, t, negative_context, y_, "uncond"), cfg)

    return fn


def _pad_rows(ctx, batch):
    """Bring text to 512 rows and batch `batch` so positive and negative can be concatenated."""
    ctx = ctx[:, :512]
    if ctx.shape[1] < 512:
        ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], 512 - ctx.shape[1], ctx.shape[2])], 1)
    return ctx.expand(batch, -1, -1) if ctx.shape[0] == 1 else ctx


def sample_video(model, context, negative_context, latent_raw, seed, steps=50, cfg=5.0, shift=5.0,
                 solver="unipc", denoise=1.0, y=None, clip_fea=None, image_strength=1.0, callback=None,
                 t_offset=0, batch_cfg=False, velocity_fn=None, step_cache=None):
    """Sample a video latent; returns RAW VAE space [B, 16, F, H, W] float32 on the model's device.

    latent_raw: the starting LATENT samples (zeros for text-to-video; a video's latent for denoise < 1).
    y / clip_fea / image_strength: the I2V / FLF2V condition (y in DiT space, see models/conditioning.py).
    callback(info) is called after every step with the sampler's dict (i, x, sigma, denoised, total).
    velocity_fn: optional replacement of make_velocity_fn's (e.g. long-video guidance).
    step_cache: a threshold (0: off) or a models.wan.step_cache.StepCache (pass one to read its counters
    afterwards); a fresh cache state is used for every call.
    """
    device = model.device
    x0 = wan_latent.normalize(latent_raw.to(device=device, dtype=torch.float32))
    sigmas = sampling.wan_sigmas(steps, shift, solver, denoise)
    noise = sampling.seeded_noise(tuple(x0.shape), seed).to(device)
    x = noise if denoise >= 1.0 else sampling.noise_latent(x0, noise, float(sigmas[0]))
    cache = as_step_cache(step_cache)
    if cache is not None:
        cache.reset()
        if velocity_fn is not None:
            raise ValueError("step_cache applies to sample_video's own velocity function; wrap the model of a custom "
                             "velocity_fn in models.wan.step_cache.CachedModel instead")
    if velocity_fn is None:
        velocity_fn = make_velocity_fn(model, context, negative_context, cfg, y=y, clip_fea=clip_fea,
                                       image_strength=image_strength, t_offset=t_offset, batch_cfg=batch_cfg,
                                       step_cache=cache)
    with torch.inference_mode():
        out = sampling.sample(velocity_fn, x, sigmas, solver, callback=callback)
    return wan_latent.denormalize(out.float())
