"""CVG Load VAE / CVG VAE Encode / CVG VAE Decode through a real ComfyUI server (the `comfy` fixture).

A tiny random-weight Wan VAE file is written into the server's vae folder. Oracle for the numbers:
diffusers AutoencoderKLWan with the same weights, run in this process on the same input frames.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.wan import vae as wv
from models.wan import vae_loading as vl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_wan_vae import diffusers_twin, randomize  # noqa: E402

CFG = dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
H, W = 16, 24
VAE_FILE = "cvg_tiny_wan_vae.safetensors"


@pytest.fixture(scope="module")
def setup(comfy):
    model = randomize(wv.WanVAE(**CFG).eval().requires_grad_(False), seed=11)
    vl.save_wan_vae(model, comfy.models_dir / "vae" / VAE_FILE)
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(H, W, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(comfy.input_dir / "cvg_vae_src.png")
    from safetensors.torch import save_file

    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)},
              comfy.models_dir / "vae" / "cvg_not_a_vae.safetensors")
    return model, torch.from_numpy(pixels).float() / 255.0


def graph(frames, tiling="off", tile_size=512, tile_overlap=64):
    return {
        "1": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE_FILE, "dtype": "fp32", "device": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "cvg_vae_src.png"}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": frames}},
        "4": {"class_type": "CVGVAEEncode", "inputs": {"vae": ["1", 0], "images": ["3", 0]}},
        "5": {"class_type": "CVGVAEDecode", "inputs": {"vae": ["1", 0], "samples": ["4", 0], "tiling": tiling,
                                                       "tile_size": tile_size, "tile_overlap": tile_overlap}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"cvg_vae_{tiling}"}},
    }


def test_nodes_registered_and_vae_folder_listed(comfy, setup):
    info = comfy.object_info()
    assert not comfy.import_failures()
    load = info["CVGLoadVAE"]["input"]["required"]
    assert list(load) == ["vae_name", "dtype", "device"]
    assert VAE_FILE in load["vae_name"][0]
    assert list(info["CVGVAEDecode"]["input"]["required"]) == ["vae", "samples", "tiling", "tile_size", "tile_overlap"]
    assert info["CVGVAEEncode"]["output"] == ["LATENT"]
    assert info["CVGLoadVAE"]["display_name"] == "CVG Load VAE"


def _saved_frames(comfy, outputs):
    files = outputs["6"]["images"]
    arrays = [np.asarray(Image.open(comfy.output_dir / f["subfolder"] / f["filename"])) for f in files]
    return np.stack(arrays)


def test_encode_decode_roundtrip_matches_diffusers(comfy, setup):
    model, frame = setup
    outputs = comfy.run(graph(5, tiling="auto"))  # auto: whole frames fit, so no tiles -> exact
    got = _saved_frames(comfy, outputs)
    assert got.shape == (5, H, W, 3) and got.dtype == np.uint8
    assert got.std() > 5  # not a constant image
    # oracle: diffusers with the same weights on the same frames
    ref = diffusers_twin(model)
    video = (frame.permute(2, 0, 1)[:, None].expand(3, 5, H, W)[None] * 2 - 1).contiguous()
    with torch.inference_mode():
        z = ref.encode(video).latent_dist.mode()
        y = ref.decode(z).sample
    expected = ((y[0].permute(1, 2, 3, 0) + 1) * 0.5).clamp(0, 1).mul(255).numpy()
    assert np.abs(got.astype(np.float64) - expected).max() <= 1.0  # SaveImage rounds to 8 bits


def test_tiled_decode_through_the_node(comfy, setup):
    outputs = comfy.run(graph(5, tiling="manual", tile_size=16, tile_overlap=8))
    got = _saved_frames(comfy, outputs)
    assert got.shape == (5, H, W, 3)
    assert 0 <= got.min() and got.max() <= 255 and got.std() > 5


def test_frame_count_error_names_valid_counts(comfy, setup):
    err = comfy.run_expect_error(graph(6))
    assert "6 is not of the form 4k+1" in err and "Use 5 or 9" in err


def test_wrong_file_gets_a_clear_error(comfy, setup):
    prompt = graph(5)
    prompt["1"]["inputs"]["vae_name"] = "cvg_not_a_vae.safetensors"
    err = comfy.run_expect_error(prompt)
    assert "not a Wan2.1 VAE" in err and "diffusion model" in err
