"""Known-frame conditioning for Wan I2V / FLF2V (REFERENCE.md §2), generalised to any set of frames.

The I2V/FLF2V DiT takes ``y = [mask (4) ; condition latent (16)]`` (20 channels, DiT/normalised space)
concatenated after the 16 noisy channels.

* ``frame_mask``: 4-channel mask from a set of known *pixel* frames. The reference builds a per-pixel-frame
  mask m[0..F−1], repeats frame 0 four times (so the sequence has 4·T_lat entries) and views it as
  [T_lat, 4]: latent frame k, channel c = entry 4k + c. Pixel frame 0 → latent 0, all four channels;
  pixel frame p ≥ 1 → latent (p + 3) // 4, channel (p + 3) % 4. I2V = {0}, FLF2V = {0, F − 1}.
* ``condition_video``: the known frames placed at their positions, zeros (mid-grey in −1..1) elsewhere;
  the VAE encodes it as one clip and the result is normalised.
* ComfyUI's native nodes (``WanImageToVideo``, ``WanFirstLastFrameToVideo``) put the raw-space
  ``concat_latent_image`` and ``concat_mask`` (0 = known, 1 = generate; 1 channel per latent frame or
  4 channels) into the CONDITIONING; :func:`y_from_native` turns that into the same ``y``.

How the pack carries it between nodes (``CVG I2V Conditioner`` → ``CVG Sampler``): the LATENT dict gets an
extra key ``"cvg_cond"`` holding a dict made by :func:`make_condition_entry`:
``{"y": [1,20,T,h,w] float32 (DiT space), "clip_fea": [1,257|514,1280] or None, "image_strength": λ,
"known_pixel_frames": tuple, "num_frames": F, "noise_level": s}``; ``"samples"`` stays the raw-space
starting latent (zeros). :func:`resolve_condition` reads either that key or the native CONDITIONING
options and returns the dict the sampler needs.

Pure PyTorch; no ComfyUI import.
"""
import math

import torch
import torch.nn.functional as F

from .wan import latent as wan_latent

MASK_CHANNELS = 4
CLIP_TOKENS = 257
CLIP_WIDTH = 1280
COND_KEY = "cvg_cond"


# ------------------------------------------------------------------------------------------- sizes

def latent_size_for_area(image_height, image_width, max_area, vae_stride=8, patch=2):
    """Reference latent size for a max pixel area: lat_h = round(sqrt(A·h/w) // 8 // 2 · 2), lat_w alike.

    Returns (lat_h, lat_w); pixels are 8·lat (480×832 → 60×104)."""
    if image_height <= 0 or image_width <= 0 or max_area <= 0:
        raise ValueError(f"image size and max_area must be positive, got {image_height}×{image_width}, {max_area}")
    aspect = image_height / image_width
    lat_h = round(math.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // vae_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"max_area {max_area} is too small for a {image_height}×{image_width} image")
    return lat_h, lat_w


def check_pixel_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(
            f"video size {width}×{height} must be a positive multiple of 16 in both directions (VAE stride 8 × "
            f"patch 2); use e.g. {max(16, width // 16 * 16)}×{max(16, height // 16 * 16)}")


# ------------------------------------------------------------------------------------------ images

def images_to_model(images):
    """ComfyUI IMAGE [T,H,W,C] (or [H,W,C]) in 0..1 → [T,3,H,W] in −1..1 (alpha dropped)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE [frames, height, width, channels], got shape {tuple(images.shape)}")
    x = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
    return x.permute(0, 3, 1, 2).to(torch.float32) * 2.0 - 1.0


def resize_image_bicubic(images, height, width):
    """Resize [T,3,H,W] (−1..1) to (height, width) like the reference: the whole image, bicubic,
    align_corners=False, no antialias, no crop, no clamp."""
    if images.ndim != 4:
        raise ValueError(f"expected [frames, 3, H, W], got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False)


# ------------------------------------------------------------------------------------------- masks

def _check_known(num_frames, known):
    wan_latent.check_frame_count(num_frames, "video length")
    known = sorted({int(k) for k in known})
    for k in known:
        if not 0 <= k < num_frames:
            raise ValueError(f"known frame index {k} is outside the video (0..{num_frames - 1})")
    return known


def pixel_mask(num_frames, known_pixel_frames):
    """1-D per-pixel-frame mask, 1 = known."""
    known = _check_known(num_frames, known_pixel_frames)
    m = torch.zeros(num_frames)
    if known:
        m[known] = 1.0
    return m


def frame_mask(num_frames, known_pixel_frames, lat_h, lat_w):
    """The reference's 4-channel mask [4, T_lat, lat_h, lat_w] for a set of known pixel frames."""
    m = pixel_mask(num_frames, known_pixel_frames)
    seq = torch.cat([m[:1].repeat(4), m[1:]])           # 4·T_lat entries
    t_lat = wan_latent.latent_frames(num_frames)
    grid = seq.view(t_lat, MASK_CHANNELS).transpose(0, 1)  # [4, T_lat]
    return grid[:, :, None, None].expand(MASK_CHANNELS, t_lat, lat_h, lat_w).contiguous()


def latent_frame_mask(num_latent_frames, known_latent_frames, lat_h, lat_w):
    """Mask with whole latent frames known (all 4 channels), as ComfyUI's native I2V builds it."""
    m = torch.zeros(MASK_CHANNELS, num_latent_frames, lat_h, lat_w)
    for k in known_latent_frames:
        if not 0 <= k < num_latent_frames:
            raise ValueError(f"known latent frame {k} is outside 0..{num_latent_frames - 1}")
        m[:, k] = 1.0
    return m


def known_latent_frames(mask):
    """Latent frames that carry any known pixel frame, from a [4,T,h,w] or [B,4,T,h,w] mask."""
    if mask.ndim == 5:
        mask = mask[0]
    return [k for k in range(mask.shape[1]) if bool(mask[:, k].amax() > 0)]


# ------------------------------------------------------------------------------------------ latents

def normalize_reference(z_raw):
    """raw VAE latent → DiT space as the reference and diffusers compute it: (z − mean)·(1/std)."""
    shape = (1, -1) + (1,) * (z_raw.ndim - 2)
    mean = torch.tensor(wan_latent.LATENT_MEAN, dtype=z_raw.dtype, device=z_raw.device).view(shape)
    inv_std = 1.0 / torch.tensor(wan_latent.LATENT_STD, dtype=z_raw.dtype, device=z_raw.device).view(shape)
    return (z_raw - mean) * inv_std


def condition_video(frames_by_index, num_frames, height, width):
    """[1,3,F,H,W] in −1..1: each known frame ([3,H,W] or [1,3,H,W]) at its index, zeros elsewhere."""
    known = _check_known(num_frames, frames_by_index.keys())
    check_pixel_size(height, width)
    video = torch.zeros(1, 3, num_frames, height, width)
    for k in known:
        frame = frames_by_index[k]
        if frame.ndim == 4:
            frame = frame[0]
        if tuple(frame.shape) != (3, height, width):
            raise ValueError(
                f"known frame {k} has shape {tuple(frame.shape)}, expected (3, {height}, {width}); resize it "
                f"to the video size first (resize_image_bicubic)")
        video[0, :, k] = frame.to(video.dtype)
    return video


def build_condition(encode, frames_by_index, num_frames, height, width):
    """y [1, 20, T_lat, h, w] (DiT space) = [frame_mask ; normalised encode(condition_video)].

    ``encode(video [1,3,F,H,W] in −1..1) -> raw latent [1,16,T_lat,h,w]`` (WanVAE.encode)."""
    video = condition_video(frames_by_index, num_frames, height, width)
    z = encode(video)
    t_lat = wan_latent.latent_frames(num_frames)
    h, w = height // wan_latent.SPATIAL_STRIDE, width // wan_latent.SPATIAL_STRIDE
    if tuple(z.shape) != (1, wan_latent.LATENT_CHANNELS, t_lat, h, w):
        raise ValueError(f"the VAE returned a latent of shape {tuple(z.shape)}, expected "
                         f"(1, 16, {t_lat}, {h}, {w}); is this a Wan VAE?")
    z = normalize_reference(z.to(torch.float32))
    mask = frame_mask(num_frames, frames_by_index.keys(), h, w).to(z.device, z.dtype)
    return torch.cat([mask[None], z], dim=1)


def perturb_condition(y, level, seed):
    """Noise augmentation of the condition latent: z_s = (1 − s)·z + s·ε on the latent frames that hold
    known frames (mask > 0), ε from ``seed`` (CPU generator). The mask channels are untouched."""
    if level == 0:
        return y
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"noise level must be in [0, 1] (σ units), got {level}")
    from .sampling import seeded_noise
    y = y.clone()
    cond = y[:, MASK_CHANNELS:]
    eps = seeded_noise(cond.shape, seed).to(cond.device, cond.dtype)
    for k in known_latent_frames(y[:, :MASK_CHANNELS]):
        cond[:, :, k] = (1.0 - level) * cond[:, :, k] + level * eps[:, :, k]
    return y


# -------------------------------------------------------------------------------------------- CLIP

def clip_features(*hidden_states):
    """CLIP-vision penultimate states (each [B,257,1280] or [257,1280]) → [1, 257·n, 1280] (n = 1 for I2V,
    2 for FLF2V, first frame first)."""
    out = []
    for i, h in enumerate(hidden_states):
        if h is None:
            continue
        h = getattr(h, "penultimate_hidden_states", h)
        if h.ndim == 2:
            h = h[None]
        if h.ndim != 3 or h.shape[-1] != CLIP_WIDTH:
            raise ValueError(
                f"CLIP vision output {i} has shape {tuple(h.shape)}; Wan I2V needs clip_vision_h "
                f"penultimate states of width {CLIP_WIDTH} ([1, 257, 1280]). Load clip_vision_h.safetensors "
                f"in CLIPVisionLoader")
        out.append(h.reshape(1, -1, CLIP_WIDTH).to(torch.float32))  # a batch of frames → one token sequence
    if not out:
        return None
    feats = torch.cat(out, dim=1)
    if feats.shape[1] not in (CLIP_TOKENS, 2 * CLIP_TOKENS):
        raise ValueError(
            f"CLIP vision features hold {feats.shape[1]} tokens; Wan takes one image (257 tokens, I2V) or two "
            f"(514, FLF2V: first and last frame). Encode one image per CLIPVisionEncode")
    return feats


# -------------------------------------------------------------------------------- native interop

def y_from_native(concat_latent_image, concat_mask, noise_shape=None):
    """ComfyUI native I2V conditioning → y [B,20,T,h,w] (DiT space), as the native model builds it.

    ``concat_latent_image`` raw VAE space [B,16,T,h,w]; ``concat_mask`` [B,1|4,T',h,w] with 0 = known. A
    1-channel mask is repeated to 4 channels; a shorter mask is padded with "generate"; the latent is
    normalised."""
    z = concat_latent_image
    if z.ndim != 5 or z.shape[1] != wan_latent.LATENT_CHANNELS:
        raise ValueError(f"concat_latent_image must be a Wan latent [B,16,T,h,w], got {tuple(z.shape)}")
    if noise_shape is not None and tuple(z.shape[-3:]) != tuple(noise_shape[-3:]):
        raise ValueError(
            f"the I2V condition latent is {tuple(z.shape[-3:])} (frames, h, w) but the latent being sampled is "
            f"{tuple(noise_shape[-3:])}; give the sampler the LATENT made by the same I2V node")
    cond = normalize_reference(z.to(torch.float32))
    if concat_mask is None:
        mask = torch.zeros(z.shape[0], MASK_CHANNELS, *z.shape[2:], dtype=cond.dtype, device=cond.device)
    else:
        m = concat_mask.to(cond.device, cond.dtype)
        if m.ndim == 4:
            m = m[:, None]
        if m.shape[1] not in (1, MASK_CHANNELS):
            m = m.mean(dim=1, keepdim=True)
        m = 1.0 - m
        if tuple(m.shape[-2:]) != tuple(z.shape[-2:]):
            raise ValueError(f"concat_mask spatial size {tuple(m.shape[-2:])} does not match the latent "
                             f"{tuple(z.shape[-2:])}")
        if m.shape[2] < z.shape[2]:
            m = F.pad(m, (0, 0, 0, 0, 0, z.shape[2] - m.shape[2]), value=0.0)
        m = m[:, :, :z.shape[2]]
        if m.shape[1] == 1:
            m = m.repeat(1, MASK_CHANNELS, 1, 1, 1)
        mask = m.expand(z.shape[0], -1, -1, -1, -1)
    return torch.cat([mask, cond], dim=1)


def make_condition_entry(y, clip_fea=None, image_strength=1.0, known_pixel_frames=(), num_frames=None,
                         noise_level=0.0):
    """The dict the pack stores under LATENT["cvg_cond"] (see the module docstring)."""
    if y.ndim != 5 or y.shape[1] != MASK_CHANNELS + wan_latent.LATENT_CHANNELS:
        raise ValueError(f"y must be [B,20,T,h,w], got {tuple(y.shape)}")
    return {"y": y, "clip_fea": clip_fea, "image_strength": float(image_strength),
            "known_pixel_frames": tuple(int(k) for k in known_pixel_frames),
            "num_frames": num_frames, "noise_level": float(noise_level)}


def resolve_condition(latent, cond_options=None):
    """What an I2V/FLF2V sampler needs, from a LATENT dict (``cvg_cond``) or native CONDITIONING options
    (``concat_latent_image`` / ``concat_mask`` / ``clip_vision_output``). None when neither is present.

    Returns ``{"y": [B,20,T,h,w], "clip_fea": tensor or None, "image_strength": float, "source": "cvg"|"native"}``.
    """
    entry = latent.get(COND_KEY) if isinstance(latent, dict) else None
    shape = tuple(latent["samples"].shape) if isinstance(latent, dict) and "samples" in latent else None
    if entry is not None:
        y = entry["y"]
        if shape is not None and tuple(y.shape[-3:]) != shape[-3:]:
            raise ValueError(f"the I2V condition is for a latent of {tuple(y.shape[-3:])} (frames, h, w) but the "
                             f"LATENT holds {shape[-3:]}; do not resize the latent after the I2V conditioner")
        return {"y": y, "clip_fea": entry.get("clip_fea"), "image_strength": entry.get("image_strength", 1.0),
                "source": "cvg"}
    opts = cond_options or {}
    if "concat_latent_image" in opts:
        y = y_from_native(opts["concat_latent_image"], opts.get("concat_mask"), shape)
        cvo = opts.get("clip_vision_output")
        return {"y": y, "clip_fea": clip_features(cvo) if cvo is not None else None, "image_strength": 1.0,
                "source": "native"}
    return None


def check_model_condition(in_dim, condition):
    """Clear errors for I2V conditioning given to a T2V model and the reverse (in_dim 16 vs 36)."""
    needs = in_dim > wan_latent.LATENT_CHANNELS
    if needs and condition is None:
        raise ValueError(
            f"this is an image-to-video model (in_dim {in_dim}) but no image condition was given; feed the "
            f"sampler the LATENT from 'CVG I2V Conditioner' (or native WanImageToVideo conditioning)")
    if not needs and condition is not None:
        raise ValueError(
            "an image-to-video condition was given to a text-to-video model (in_dim 16); load an I2V/FLF2V "
            "checkpoint, or for T2V extension use 'CVG Extend Video', which substitutes known frames instead")
    if needs and condition["y"].shape[1] + wan_latent.LATENT_CHANNELS != in_dim:
        raise ValueError(f"model in_dim {in_dim} does not match a condition of {condition['y'].shape[1]} channels")
