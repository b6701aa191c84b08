"""Wan-VAE latent space conventions.

LATENT values passed between nodes are raw VAE space (the encoder's mu before normalisation), the same
convention as ComfyUI's native Wan latents. The DiT works in normalised space: (z - mean) / std.
"""
import torch

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8

LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _stats(z):
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mean = torch.tensor(LATENT_MEAN, dtype=z.dtype, device=z.device).view(shape)
    std = torch.tensor(LATENT_STD, dtype=z.dtype, device=z.device).view(shape)
    return mean, std


def normalize(z):
    """raw VAE space [B,16,T,H,W] -> the DiT's space."""
    mean, std = _stats(z)
    return (z - mean) / std


def denormalize(z):
    """the DiT's space -> raw VAE space."""
    mean, std = _stats(z)
    return z * std + mean


def latent_frames(pixel_frames):
    """Latent frame count for a 4k+1 pixel frame count."""
    return (pixel_frames - 1) // TEMPORAL_STRIDE + 1


def pixel_frames(latent_frames_):
    return (latent_frames_ - 1) * TEMPORAL_STRIDE + 1


def check_frame_count(frames, what="frame count"):
    """Raise a clear error for a pixel frame count that is not 4k+1, naming the nearest valid counts."""
    if frames >= 1 and (frames - 1) % TEMPORAL_STRIDE == 0:
        return
    lower = max(1, (frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)
    upper = lower + TEMPORAL_STRIDE if frames > lower else lower
    raise ValueError(
        f"{what} {frames} is not of the form 4k+1 (1, 5, 9, …, 81); the Wan VAE maps only such counts "
        f"exactly. Use {lower} or {upper} frames (trim or pad the clip, or set the length to one of them)."
    )
