"""Long-video nodes through a real ComfyUI server (the `comfy` fixture), with tiny random Wan files.

Oracles: models/long_video.py formulas (perturbation, plan totals), the DiT engineer's
models/wan/pipeline.py sampling (segment 0 of a long video is plain T2V) and the VAE engineer's
models/wan/vae.py (seam error = mean |decode(encode(tail)) − tail|, by the causality of both directions).
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import long_video as LV
from models import sampling
from models.wan import latent as wan_latent
from models.wan.dit import WanConfig, WanDiT

T2V = "cvg_lv_t2v_tiny.safetensors"
I2V = "cvg_lv_i2v_tiny.safetensors"
VAE = "cvg_lv_vae_tiny.safetensors"
TEXT_DIM = 4096
W, H = 32, 32


def tiny_dit_state(model_type, seed):
    in_dim = 16 if model_type == "t2v" else 36
    m = WanDiT(WanConfig(model_type=model_type, dim=128, ffn_dim=64, heads=1, layers=1, in_dim=in_dim))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "modulation" not in name:
                r = r / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(r)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def tiny_vae_state(seed=0):
    from models.wan.vae import WanVAE, WanVAEConfig
    vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                r = r / math.sqrt(math.prod(p.shape[1:]))
            else:
                r = 1.0 + 0.1 * r if "gamma" in name else 0.1 * r
            p.copy_(r)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def files(comfy):
    save_file(tiny_dit_state("t2v", 1), str(comfy.models_dir / "diffusion_models" / T2V))
    save_file(tiny_dit_state("i2v", 2), str(comfy.models_dir / "diffusion_models" / I2V))
    save_file(tiny_vae_state(), str(comfy.models_dir / "vae" / VAE))
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 9, TEXT_DIM, generator=g)
    neg = torch.randn(1, 4, TEXT_DIM, generator=g)
    save_file({"text_embeds": pos}, str(comfy.input_dir / "cvg_lv_pos.safetensors"))
    save_file({"text_embeds": neg}, str(comfy.input_dir / "cvg_lv_neg.safetensors"))
    return pos, neg


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for node in ("CVGLatentPerturber", "CVGExtendVideo", "CVGLongVideoSampler", "CVGKeyframes", "CVGInterpolator"):
        assert node in info, node
        assert info[node]["category"] == "CVG/long_video"
    assert not comfy.import_failures()
    assert list(info["CVGLatentPerturber"]["input"]["required"]) == ["latent", "level", "seed"]
    assert "z_s = (1 − s)·z + s·ε" in info["CVGLatentPerturber"]["description"]
    assert info["CVGLongVideoSampler"]["output"] == ["IMAGE", "STRING"]


def test_latent_perturber_formula(comfy):
    prompt = {
        "1": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 32, "height": 16, "length": 5, "batch_size": 1}},
        "2": {"class_type": "CVGLatentPerturber", "inputs": {"latent": ["1", 0], "level": 0.25, "seed": 11}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "cvg_lv_perturb"}},
    }
    out = comfy.run(prompt)
    entry = out["3"]["latents"][0]
    z = load_file(str(comfy.output_dir / entry.get("subfolder", "") / entry["filename"]))["latent_tensor"]
    zero = torch.zeros(1, 16, 2, 2, 4)
    eps = torch.randn(zero.shape, generator=torch.Generator().manual_seed(11))
    expect = wan_latent.denormalize(0.75 * wan_latent.normalize(zero) + 0.25 * eps)
    assert torch.allclose(z, expect, atol=1e-5)


def test_keyframes_from_images_every_nth(comfy):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 7, "color": 0}},
        "2": {"class_type": "CVGKeyframes", "inputs": {"mode": "from_images", "every_nth": 3, "width": 16,
                                                        "height": 16, "seed": 0, "steps": 1, "cfg": 1.0, "shift": 5.0,
                                                        "solver": "euler", "images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cvg_lv_kf"}},
    }
    out = comfy.run(prompt)
    assert len(out["3"]["images"]) == 3  # frames 0, 3, 6


def test_keyframes_prompts_need_a_model(comfy):
    prompt = {
        "2": {"class_type": "CVGKeyframes", "inputs": {"mode": "from_prompts", "every_nth": 1, "width": 16,
                                                        "height": 16, "seed": 0, "steps": 1, "cfg": 1.0, "shift": 5.0,
                                                        "solver": "euler"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cvg_lv_kf2"}},
    }
    err = comfy.run_expect_error(prompt)
    assert "from_prompts needs model, vae, positive" in err
