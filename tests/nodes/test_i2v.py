"""CVG I2V Conditioner → CVG Sampler through a real ComfyUI server, with tiny random Wan I2V / FLF2V files.

Oracle: the condition built in this process from the same image with models/conditioning.py's reference
rules on the VAE file (diffusers parity of that construction is tested in tests/models/test_conditioning.py)
and sampled with models/wan/pipeline.py.
"""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models import conditioning as C

from host import random_weights

I2V = "cvg_i2v_tiny.safetensors"
FLF = "cvg_flf2v_tiny.safetensors"
T2V = "cvg_i2v_t2v_tiny.safetensors"
VAE = "cvg_i2v_vae_tiny.safetensors"
W, H = 32, 48


@pytest.fixture(scope="module")
def files(comfy):
    from models.wan import vae_loading
    save_file(random_weights.tiny_dit_state("i2v", 4), str(comfy.models_dir / "diffusion_models" / I2V))
    save_file(random_weights.tiny_dit_state("flf2v", 5), str(comfy.models_dir / "diffusion_models" / FLF))
    save_file(random_weights.tiny_dit_state("t2v", 6), str(comfy.models_dir / "diffusion_models" / T2V))
    vae_loading.save_wan_vae(random_weights.tiny_vae(3), comfy.models_dir / "vae" / VAE)
    g = torch.Generator().manual_seed(8)
    pos, neg = torch.randn(1, 6, 4096, generator=g), torch.randn(1, 3, 4096, generator=g)
    save_file({"text_embeds": pos}, str(comfy.input_dir / "cvg_i2v_pos.safetensors"))
    save_file({"text_embeds": neg}, str(comfy.input_dir / "cvg_i2v_neg.safetensors"))
    imgs = []
    for j, size in enumerate([(40, 56), (24, 20)]):  # not the target size: the node resizes (bicubic)
        px = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(comfy.input_dir / f"cvg_i2v_img{j}.png")
        imgs.append(torch.from_numpy(px.astype("float32") / 255.0)[None])
    return pos, neg, imgs


def graph(model=I2V, end=False, strength=0.0, noise_aug=0.0, length=9, width=W, height=H):
    cond = {"vae": ["v", 0], "start_image": ["i0", 0], "width": width, "height": height, "length": length,
            "image_strength": strength, "noise_augmentation": noise_aug, "seed": 3}
    if end:
        cond["end_image"] = ["i1", 0]
    return {
        "m": {"class_type": "CVGLoadWanModel", "inputs": {"model_name": model, "weight_dtype": "default",
                                                           "attention": "sdpa", "compute_dtype": "fp32"}},
        "v": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE, "dtype": "fp32", "device": "cpu"}},
        "p": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_i2v_pos.safetensors"}},
        "n": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_i2v_neg.safetensors"}},
        "i0": {"class_type": "LoadImage", "inputs": {"image": "cvg_i2v_img0.png"}},
        "i1": {"class_type": "LoadImage", "inputs": {"image": "cvg_i2v_img1.png"}},
        "c": {"class_type": "CVGI2VConditioner", "inputs": cond},
        "s": {"class_type": "CVGSampler", "inputs": {"model": ["m", 0], "positive": ["p", 0], "negative": ["n", 0],
                                                      "latent": ["c", 0], "seed": 7, "steps": 2, "cfg": 3.0,
                                                      "shift": 3.0, "solver": "unipc", "denoise": 1.0}},
        "o": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "cvg_i2v_test"}},
    }


def _latent(comfy, outputs):
    e = outputs["o"]["latents"][0]
    return load_file(str(comfy.output_dir / e.get("subfolder", "") / e["filename"]))["latent_tensor"]


def test_node_registered(comfy):
    info = comfy.object_info()
    assert "CVGI2VConditioner" in info and not comfy.import_failures()
    node = info["CVGI2VConditioner"]
    assert list(node["input"]["required"]) == ["vae", "start_image", "width", "height", "length", "image_strength",
                                               "noise_augmentation", "seed"]
    assert list(node["input"]["optional"]) == ["end_image", "clip_vision_output", "clip_vision_output_end"]
    assert node["output"] == ["LATENT"] and node["category"] == "CVG/i2v"


@pytest.mark.parametrize("model,end,noise_aug", [(I2V, False, 0.0), (FLF, True, 0.2)])
def test_i2v_graph_matches_in_process(comfy, files, model, end, noise_aug):
    from models.wan import loading, pipeline, vae_loading
    pos, neg, imgs = files
    z = _latent(comfy, comfy.run(graph(model, end=end, noise_aug=noise_aug)))
    assert z.shape == (1, 16, 3, H // 8, W // 8)

    vae = vae_loading.load_wan_vae(comfy.models_dir / "vae" / VAE, dtype=torch.float32, device="cpu")
    frames = {0: C.resize_image_bicubic(C.images_to_model(imgs[0]), H, W)[0]}
    if end:
        frames[8] = C.resize_image_bicubic(C.images_to_model(imgs[1]), H, W)[0]
    with torch.no_grad():
        y = C.build_condition(lambda v: vae.encode(v), frames, 9, H, W)
    if noise_aug:
        eps = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
        for k in (0, 2):
            y[:, 4:, k] = (1 - noise_aug) * y[:, 4:, k] + noise_aug * eps[:, :, k]
    dit = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / model, dtype=torch.float32)
    ref = pipeline.sample_video(dit, pos, neg, torch.zeros(1, 16, 3, H // 8, W // 8), seed=7, steps=2, cfg=3.0,
                                shift=3.0, solver="unipc", y=y, image_strength=0.0)
    # CVG_VAE encodes IMAGE frames in 0..1 (x·2 − 1 inside): a few ulps from the −1..1 path here.
    print(f"max abs diff vs in-process: {(z - ref).abs().max().item():.3e}")
    assert (z - ref).abs().max().item() < 1e-4, (z - ref).abs().max().item()
    # and the condition matters: without it the result differs
    plain = pipeline.sample_video(dit, pos, neg, torch.zeros(1, 16, 3, H // 8, W // 8), seed=7, steps=2, cfg=3.0,
                                  shift=3.0, solver="unipc", y=torch.zeros_like(y), image_strength=0.0)
    assert (z - plain).abs().max().item() > 1e-2


def test_i2v_condition_on_t2v_model_is_a_clear_error(comfy, files):
    err = comfy.run_expect_error(graph(T2V))
    assert "text-to-video model" in err


def test_t2v_latent_on_i2v_model_is_a_clear_error(comfy, files):
    g = graph(I2V)
    g["e"] = {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": W, "height": H, "length": 9, "batch_size": 1}}
    g["s"]["inputs"]["latent"] = ["e", 0]
    del g["c"]
    err = comfy.run_expect_error(g)
    assert "image-to-video model" in err and "CVG I2V Conditioner" in err


def test_bad_length_and_size_are_clear_errors(comfy, files):
    assert "4k+1" in comfy.run_expect_error(graph(length=8))
    assert "multiple of 16" in comfy.run_expect_error(graph(width=40))


def test_missing_clip_features_with_strength_is_a_clear_error(comfy, files):
    err = comfy.run_expect_error(graph(strength=1.0))
    assert "CLIP vision" in err


def test_frame_guidance_matches_in_process(comfy, files):
    """CVG Sampler's frame_guidance w: v = v_tu + g·(v_c − v_tu) + w·(v_c − v_fu), oracle built here."""
    from models import long_video
    from models.wan import loading, pipeline, vae_loading
    pos, neg, imgs = files
    g = graph(I2V)
    g["s"]["inputs"]["frame_guidance"] = 1.5
    z = _latent(comfy, comfy.run(g))

    vae = vae_loading.load_wan_vae(comfy.models_dir / "vae" / VAE, dtype=torch.float32, device="cpu")
    frames = {0: C.resize_image_bicubic(C.images_to_model(imgs[0]), H, W)[0]}
    with torch.no_grad():
        y = C.build_condition(lambda v: vae.encode(v), frames, 9, H, W)
    dit = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / I2V, dtype=torch.float32)
    fn = long_video.wan_velocity_fn(dit, pos, neg, cfg_scale=3.0, y=y, image_strength=0.0, frame_guidance=1.5)
    zeros = torch.zeros(1, 16, 3, H // 8, W // 8)
    ref = pipeline.sample_video(dit, pos, neg, zeros, seed=7, steps=2, cfg=3.0, shift=3.0, solver="unipc", y=y,
                                image_strength=0.0, velocity_fn=fn)
    assert (z - ref).abs().max().item() < 1e-4
    unguided = pipeline.sample_video(dit, pos, neg, zeros, seed=7, steps=2, cfg=3.0, shift=3.0, solver="unipc", y=y,
                                     image_strength=0.0)
    assert (z - unguided).abs().max().item() > 1e-3, "frame guidance changed nothing"


def test_frame_guidance_without_condition_is_a_clear_error(comfy, files):
    g = graph(T2V)
    g["e"] = {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": W, "height": H, "length": 9, "batch_size": 1}}
    g["s"]["inputs"]["latent"] = ["e", 0]
    g["s"]["inputs"]["frame_guidance"] = 1.0
    del g["c"]
    assert "needs a frame condition" in comfy.run_expect_error(g)


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_frame_guidance_with_step_cache_and_batch_cfg_matches_in_process(comfy, files, batch_cfg):
    """CVG Sampler with frame_guidance + step_cache_threshold (+ batch_cfg): the server's latent equals the
    in-process oracle built from long_video.wan_velocity_fn on a CachedModel with the same threshold, which
    skipped some (not all) passes. A 3-block model (with one block, reusing 'the other blocks' is exact)."""
    from models import long_video
    from models.wan import loading, pipeline, vae_loading
    from models.wan.dit import WanConfig, WanDiT
    from models.wan.step_cache import CachedModel, StepCache
    pos, neg, imgs = files
    name = "cvg_i2v_tiny_3blocks.safetensors"
    m = WanDiT(WanConfig(model_type="i2v", dim=128, ffn_dim=64, heads=1, layers=3, in_dim=36))
    random_weights.randomize_dit(m, 17)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(comfy.models_dir / "diffusion_models" / name))
    vae = vae_loading.load_wan_vae(comfy.models_dir / "vae" / VAE, dtype=torch.float32, device="cpu")
    frames = {0: C.resize_image_bicubic(C.images_to_model(imgs[0]), H, W)[0]}
    with torch.no_grad():
        y = C.build_condition(lambda v: vae.encode(v), frames, 9, H, W)
    dit = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / name, dtype=torch.float32)
    zeros = torch.zeros(1, 16, 3, H // 8, W // 8)
    stream_of = (lambda *a: "batch") if batch_cfg else None

    def oracle(cache):
        fn = long_video.wan_velocity_fn(CachedModel(dit, cache, stream_of=stream_of), pos, neg, cfg_scale=3.0, y=y,
                                        image_strength=0.0, frame_guidance=1.5, batched=batch_cfg)
        return pipeline.sample_video(dit, pos, neg, zeros, seed=7, steps=6, cfg=3.0, shift=3.0, solver="unipc", y=y,
                                     image_strength=0.0, velocity_fn=fn)
    probe = StepCache(1e-30)
    plain = oracle(probe)
    dists = sorted(v for h in probe.history if h[1] for v in h[1])
    threshold = round(dists[len(dists) // 2], 2)  # about half the passes fall below it
    cache = StepCache(threshold)
    ref = oracle(cache)
    assert 0 < cache.skipped < cache.calls, (threshold, dists)
    g = graph(name)
    g["s"]["inputs"].update(steps=6, frame_guidance=1.5, step_cache_threshold=threshold, batch_cfg=batch_cfg)
    z = _latent(comfy, comfy.run(g))
    assert (z - ref).abs().max().item() < 1e-4
    assert (ref - plain).abs().max().item() > 1e-4  # the skips mattered
