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
