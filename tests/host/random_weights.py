"""Random weights for the tests' tiny models: every parameter random (the layers the reference
zero-initialises included), scaled so activations stay O(1)."""
import math

import torch


def randomize_dit(model, seed=0):
    """A WanDiT with N(0,1) weights scaled by 1/√fan-in (modulation tables and emb_pos unscaled)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "modulation" not in name and "emb_pos" not in name:
                r = r / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(r)
    return model


def randomize_vae(model, seed=0):
    """A WanVAE with random RMS gammas (around 1), biases, and fan-in-scaled weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
    return model


def tiny_dit_state(model_type, seed, layers=1):
    """State dict of a dim-128, one-head Wan DiT (head_dim 128 as the released models) in original names."""
    from models.wan.dit import WanConfig, WanDiT
    in_dim = 16 if model_type == "t2v" else 36
    m = randomize_dit(WanDiT(WanConfig(model_type=model_type, dim=128, ffn_dim=64, heads=1, layers=layers,
                                       in_dim=in_dim)), seed)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def tiny_vae(seed=0):
    """A Wan-VAE with the released stage pattern at width 8 and z_dim 16 (the latent constants' size)."""
    from models.wan.vae import WanVAE
    vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    return randomize_vae(vae.eval().requires_grad_(False), seed)
