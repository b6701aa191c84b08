"""Wan T2V nodes through a real ComfyUI server (the `comfy` fixture): a tiny random Wan model file in
diffusion_models, text embeddings from CVG Load Text Embeds, CVG Empty Video Latent -> CVG Sampler ->
a saved latent (and a decoded video when the pack's VAE decode node is present).

Oracle: the same sampling run in this process with models/wan/pipeline.py on the same file and seed.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from host.random_weights import randomize_dit, tiny_vae
from models.wan import vae_loading
from models.wan import loading, pipeline
from models.wan.dit import WanConfig, WanDiT

MODEL = "cvg_test_wan_t2v_tiny.safetensors"


def tiny_state(seed=0):
    cfg = WanConfig(model_type="t2v", dim=128, ffn_dim=64, heads=1, layers=2)
    m = randomize_dit(WanDiT(cfg), seed)
    return {"model.diffusion_model." + k: v.contiguous() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def files(comfy):
    save_file(tiny_state(), str(comfy.models_dir / "diffusion_models" / MODEL))
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 12, 4096, generator=g)
    neg = torch.randn(1, 6, 4096, generator=g)
    save_file({"text_embeds": pos}, str(comfy.input_dir / "cvg_pos.safetensors"))
    save_file({"text_embeds": neg}, str(comfy.input_dir / "cvg_neg.safetensors"))
    save_file({"text_embeds": torch.randn(1, 77, 768, generator=g)}, str(comfy.input_dir / "cvg_sd_clip.safetensors"))
    return pos, neg


def graph(model=MODEL, positive="cvg_pos.safetensors", width=32, height=48, length=5, steps=3, solver="unipc",
          seed=7, cfg=4.0, loader_extra=None, sampler_extra=None):
    g = {
        "1": {"class_type": "CVGLoadWanModel", "inputs": {"model_name": model, "weight_dtype": "default",
                                                           "attention": "sdpa", "compute_dtype": "fp32"}},
        "2": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": positive}},
        "3": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_neg.safetensors"}},
        "4": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": width, "height": height, "length": length,
                                                               "batch_size": 1}},
        "5": {"class_type": "CVGSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                      "latent": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                      "shift": 5.0, "solver": solver, "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "cvg_wan_test"}},
    }
    g["1"]["inputs"].update(loader_extra or {})
    g["5"]["inputs"].update(sampler_extra or {})
    return g


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for node in ("CVGLoadWanModel", "CVGEmptyVideoLatent", "CVGSampler", "CVGLoadTextEmbeds"):
        assert node in info, node
    assert not comfy.import_failures()
    assert list(info["CVGSampler"]["input"]["required"]) == [
        "model", "positive", "negative", "latent", "seed", "steps", "cfg", "shift", "solver", "denoise"]
    assert info["CVGSampler"]["input"]["required"]["solver"][0] == ["unipc", "euler", "dpmpp_2m"]
    assert info["CVGEmptyVideoLatent"]["input"]["required"]["length"][1]["default"] == 81


def _saved_latent(comfy, outputs, node="6"):
    entry = outputs[node]["latents"][0]
    path = comfy.output_dir / entry.get("subfolder", "") / entry["filename"]
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_t2v_graph_matches_in_process_sampling(comfy, files, solver):
    pos, neg = files
    outputs = comfy.run(graph(solver=solver))
    z = _saved_latent(comfy, outputs)
    assert z.shape == (1, 16, 2, 6, 4)  # 5 frames -> 2 latent frames, 48x32 px -> 6x4
    model = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / MODEL, dtype=torch.float32)
    ref = pipeline.sample_video(model, pos, neg, torch.zeros(1, 16, 2, 6, 4), seed=7, steps=3, cfg=4.0, shift=5.0,
                                solver=solver)
    assert (z - ref).abs().max().item() < 1e-4
    assert z.abs().max() > 0.1


def test_empty_latent_rejects_bad_length(comfy, files):
    g = graph(length=6)
    err = comfy.run_expect_error(g)
    assert "4k+1" in err


def test_wrong_text_width_is_a_clear_error(comfy, files):
    err = comfy.run_expect_error(graph(positive="cvg_sd_clip.safetensors"))
    assert "width 4096" in err and "umT5" in err


def test_vae_file_in_diffusion_models_is_named(comfy, files):
    vae_keys = ["encoder.conv1.weight", "encoder.conv1.bias", "decoder.conv1.weight", "conv1.weight", "conv2.weight"]
    save_file({k: torch.zeros(2) for k in vae_keys}, str(comfy.models_dir / "diffusion_models" / "cvg_fake_vae.safetensors"))
    err = comfy.run_expect_error(graph(model="cvg_fake_vae.safetensors"))
    assert "Wan VAE, not a diffusion model" in err


VAE = "cvg_test_wan_vae_tiny.safetensors"


def test_t2v_graph_decoded_and_saved(comfy, files):
    """Empty latent -> sampler -> CVG VAE Decode -> CVG Save Video: a 5-frame 32x48 video file exists."""
    from models import video_files as vf

    vae_loading.save_wan_vae(tiny_vae(), comfy.models_dir / "vae" / VAE)
    g = graph(steps=2)
    g["6"] = {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE, "dtype": "fp32", "device": "auto"}}
    g["7"] = {"class_type": "CVGVAEDecode", "inputs": {"vae": ["6", 0], "samples": ["5", 0], "tiling": "off",
                                                        "tile_size": 512, "tile_overlap": 64}}
    g["8"] = {"class_type": "CVGSaveVideo", "inputs": {"images": ["7", 0], "filename_prefix": "cvg_wan_t2v",
                                                        "format": "mkv-ffv1", "fps": 16.0, "crf": 19,
                                                        "preset": "veryfast"}}
    outputs = comfy.run(g)
    entry = outputs["8"]["cvg_video"][0]
    path = comfy.output_dir / entry["subfolder"] / entry["filename"]
    assert path.exists()
    frames = vf.read_video(str(path))
    frames = frames[0] if isinstance(frames, tuple) else frames
    assert tuple(frames.shape[:3]) == (5, 48, 32)


def test_sharded_diffusers_folder_through_the_loader_node(comfy, files):
    """A diffusers-layout model sharded with an index.json in a sub-folder of diffusion_models is listed
    (its shards are not) and samples the same latent as the original-layout file."""
    state = {k[len("model.diffusion_model."):]: v for k, v in tiny_state().items()}
    dsd = loading.original_to_diffusers(state)
    names = sorted(dsd)
    folder = comfy.models_dir / "diffusion_models" / "cvg_wan_diffusers"
    folder.mkdir(exist_ok=True)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        save_file({k: dsd[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    index = "cvg_wan_diffusers/diffusion_pytorch_model.safetensors.index.json"
    (comfy.models_dir / "diffusion_models" / index).write_text(json.dumps({"weight_map": weight_map}))
    choices = comfy.object_info()["CVGLoadWanModel"]["input"]["required"]["model_name"][0]
    assert index in choices
    assert not any("-of-00002" in c for c in choices)
    a = _saved_latent(comfy, comfy.run(graph(model=index, steps=2, seed=11)))
    b = _saved_latent(comfy, comfy.run(graph(steps=2, seed=11)))
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5


def test_speed_options_appended_at_the_end(comfy):
    info = comfy.object_info()
    assert list(info["CVGSampler"]["input"]["optional"]) == ["frame_guidance", "step_cache_threshold", "batch_cfg",
                                                             "multi_gpu"]
    assert info["CVGSampler"]["input"]["optional"]["step_cache_threshold"][1]["default"] == 0.0
    assert info["CVGSampler"]["input"]["optional"]["batch_cfg"][1]["default"] is False
    assert list(info["CVGLoadWanModel"]["input"]["optional"]) == ["compute_dtype", "blocks_to_swap"]
    assert info["CVGLoadWanModel"]["input"]["optional"]["blocks_to_swap"][1]["default"] == 0


def test_batch_cfg_equals_unbatched(comfy, files):
    a = _saved_latent(comfy, comfy.run(graph(seed=21, sampler_extra={"batch_cfg": True})))
    b = _saved_latent(comfy, comfy.run(graph(seed=21, sampler_extra={"batch_cfg": False})))
    assert a.abs().max() > 0.1
    assert (a - b).abs().max().item() < 1e-4


def test_step_cache_through_the_sampler_matches_in_process(comfy, files):
    """threshold 0.2 on the tiny random model skips some steps (counted in process with the same cache) and
    the server's latent equals the in-process cached sampling; threshold 0 equals the plain sampler."""
    from models.wan.step_cache import StepCache

    pos, neg = files
    model = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / MODEL, dtype=torch.float32)
    cache = StepCache(0.2)
    ref = pipeline.sample_video(model, pos, neg, torch.zeros(1, 16, 2, 6, 4), seed=8, steps=6, cfg=4.0, shift=5.0,
                                solver="unipc", step_cache=cache)
    assert 0 < cache.skipped < cache.calls
    z = _saved_latent(comfy, comfy.run(graph(seed=8, steps=6, sampler_extra={"step_cache_threshold": 0.2})))
    assert (z - ref).abs().max().item() < 1e-4
    off = _saved_latent(comfy, comfy.run(graph(seed=8, steps=6, sampler_extra={"step_cache_threshold": 0.0})))
    plain = pipeline.sample_video(model, pos, neg, torch.zeros(1, 16, 2, 6, 4), seed=8, steps=6, cfg=4.0, shift=5.0,
                                  solver="unipc")
    assert (off - plain).abs().max().item() < 1e-4
    assert (z - off).abs().max().item() > 1e-4  # the skips changed something


def test_blocks_to_swap_through_the_loader(comfy, files):
    a = _saved_latent(comfy, comfy.run(graph(seed=12, steps=2, loader_extra={"blocks_to_swap": 1})))
    b = _saved_latent(comfy, comfy.run(graph(seed=12, steps=2, loader_extra={"blocks_to_swap": 0})))
    assert (a - b).abs().max().item() < 1e-6
    err = comfy.run_expect_error(graph(seed=12, steps=2, loader_extra={"blocks_to_swap": 5}))
    assert "blocks_to_swap is 5" in err and "2 transformer blocks" in err


def test_fp8_scaled_mm_weight_dtype_through_the_loader(comfy, files):
    """weight_dtype fp8_e4m3fn_scaled_mm is appended (existing choices, order and default kept). Where torch has
    an fp8 scaled-matmul kernel for the server's device the graph samples what the same loader option samples
    in process (and not the plain model's latent); where it has none the loader stops with the error."""
    from models.wan.dit import scaled_mm_unsupported

    pos, neg = files
    choices, options = comfy.object_info()["CVGLoadWanModel"]["input"]["required"]["weight_dtype"]
    assert choices == ["default", "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32", "fp8_e4m3fn_scaled_mm"]
    assert options["default"] == "default" and "8.9" in options["tooltip"]
    g = graph(seed=13, steps=2, loader_extra={"weight_dtype": "fp8_e4m3fn_scaled_mm"})
    if scaled_mm_unsupported("cpu") is not None:  # the test server runs on the CPU
        err = comfy.run_expect_error(g)
        assert "fp8 tensor cores" in err and "Pick weight_dtype 'fp8_e4m3fn'" in err
        return
    z = _saved_latent(comfy, comfy.run(g))
    model = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / MODEL, dtype=torch.float32,
                                 weight_dtype=loading.SCALED_MM)
    assert model.blocks[0].self_attn.q.runs_scaled_mm
    ref = pipeline.sample_video(model, pos, neg, torch.zeros(1, 16, 2, 6, 4), seed=13, steps=2, cfg=4.0, shift=5.0,
                                solver="unipc")
    assert (z - ref).abs().max().item() < 1e-4
    plain = _saved_latent(comfy, comfy.run(graph(seed=13, steps=2)))
    assert (z - plain).abs().max().item() > 1e-4  # the fp8 matmuls changed something
