"""Long work stops when the user interrupts (POST /interrupt), through a real ComfyUI server, and leaves
no partial output file behind. Uninterrupted, these jobs take about 29 s (sampler, 1000 steps) and 58 s
(decode of 1021 frames to mp4) on the 2-core CI machine, so stopping within 5 s shows the nodes' own
per-step / per-chunk checks work, not ComfyUI's check between nodes."""
import time

import pytest
import torch
from safetensors.torch import save_file

from host import random_weights

DIT = "cvg_interrupt_t2v.safetensors"
VAE = "cvg_interrupt_vae.safetensors"


@pytest.fixture(scope="module")
def files(comfy):
    from models.wan import vae_loading
    save_file(random_weights.tiny_dit_state("t2v", 11), str(comfy.models_dir / "diffusion_models" / DIT))
    vae_loading.save_wan_vae(random_weights.tiny_vae(5), comfy.models_dir / "vae" / VAE)
    g = torch.Generator().manual_seed(0)
    save_file({"text_embeds": torch.randn(1, 4, 4096, generator=g)}, str(comfy.input_dir / "cvg_int_pos.safetensors"))


def run_and_interrupt(comfy, prompt, after=1.5):
    """Queue `prompt`, interrupt it once it has been running for `after` seconds; return (error, seconds)."""
    prompt_id = comfy.queue(prompt)
    deadline = time.time() + 60
    while not comfy.get("/queue")["queue_running"]:
        assert time.time() < deadline, "the prompt never started"
        time.sleep(0.05)
    time.sleep(after)
    started = time.time()
    comfy.post("/interrupt", {})
    try:
        comfy.wait(prompt_id, timeout=120)
    except Exception as e:  # noqa: BLE001 - the server's error is what we check
        return str(e), time.time() - started
    raise AssertionError("the prompt finished although it was interrupted")


def test_sampler_stops_on_interrupt(comfy, files):
    prompt = {
        "m": {"class_type": "CVGLoadWanModel", "inputs": {"model_name": DIT, "weight_dtype": "default",
                                                           "attention": "sdpa", "compute_dtype": "fp32"}},
        "p": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_int_pos.safetensors"}},
        "e": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 64, "height": 64, "length": 81, "batch_size": 1}},
        "s": {"class_type": "CVGSampler", "inputs": {"model": ["m", 0], "positive": ["p", 0], "negative": ["p", 0],
                                                      "latent": ["e", 0], "seed": 0, "steps": 1000, "cfg": 3.0,
                                                      "shift": 5.0, "solver": "euler", "denoise": 1.0}},
        "o": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "cvg_interrupted"}},
    }
    before = set(comfy.output_files())
    error, seconds = run_and_interrupt(comfy, prompt)
    assert "interrupt" in error.lower(), error
    assert seconds < 5, f"the sampler took {seconds:.1f}s to stop"
    assert set(comfy.output_files()) == before


def test_decode_to_video_stops_on_interrupt_and_leaves_no_file(comfy, files):
    prompt = {
        "v": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE, "dtype": "fp32", "device": "cpu"}},
        "e": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 128, "height": 128, "length": 1021,
                                                               "batch_size": 1}},
        "d": {"class_type": "CVGDecodeToVideo", "inputs": {"samples": ["e", 0], "vae": ["v", 0],
                                                            "filename_prefix": "cvg_interrupted", "format": "mp4",
                                                            "fps": 16.0, "crf": 19, "preset": "medium"}},
    }
    before = {p.name for p in comfy.output_dir.rglob("*")}
    error, seconds = run_and_interrupt(comfy, prompt)
    assert "interrupt" in error.lower(), error
    assert seconds < 5, f"the decode took {seconds:.1f}s to stop"
    assert {p.name for p in comfy.output_dir.rglob("*")} == before, "a partial or temporary file was left behind"
