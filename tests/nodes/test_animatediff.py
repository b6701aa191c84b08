"""AnimateDiff nodes on the real ComfyUI test host.

A randomly initialised full-layout SD1.5 checkpoint (the real key set and shapes, read from the host's own
model classes on the meta device, so ComfyUI detects it as SD15) and full-size v3-layout motion modules are
generated once and cached under ~/.cache/comfyui-cvg/test-models (keyed by a seed), then sampled with the
native KSampler over 16 frames of a 4×4 latent (32×32 pixels).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.animatediff import motion_module as mm

SEED = 1234
CACHE = Path(os.environ.get("CVG_CACHE") or Path.home() / ".cache" / "comfyui-cvg") / "test-models"

KEYS_SCRIPT = r'''
import json, sys
out = sys.argv[1]
import torch
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import comfy.ops
import comfy.model_detection
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
import comfy.sd1_clip
shapes = {}
with torch.device("meta"), torch.no_grad():
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                     channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, legacy=False,
                     operations=comfy.ops.disable_weight_init)
    shapes.update({"model.diffusion_model." + k: list(v.shape) for k, v in unet.state_dict().items()})
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=dd, embed_dim=4)
    shapes.update({"first_stage_model." + k: list(v.shape) for k, v in vae.state_dict().items()})
with torch.no_grad():
    clip = comfy.sd1_clip.SDClipModel(device="meta")
shapes.update({"cond_stage_model." + k: list(v.shape) for k, v in clip.state_dict().items() if k.startswith("transformer.")})
meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
detected = type(comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")).__name__
if detected != "SD15":
    raise SystemExit(f"the generated layout is detected as {detected}, not SD15")
json.dump(shapes, open(out, "w"))
'''


def _random(name, shape, g, std_scale=1.0):
    if len(shape) == 1:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) * (std_scale / math.sqrt(fan_in))


def _atomic_save(tensors, path, metadata=None):
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def sd15_checkpoint(comfy_tree):
    path = CACHE / f"sd15_random_fp16_seed{SEED}.safetensors"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    keys = CACHE / "sd15_layout.json"
    if not keys.is_file():
        subprocess.run([sys.executable, "-c", KEYS_SCRIPT, str(keys)], cwd=comfy_tree, check=True,
                       env=dict(os.environ, PYTHONPATH=str(comfy_tree)), timeout=300)
    shapes = json.loads(keys.read_text())
    g = torch.Generator().manual_seed(SEED)
    tensors = {k: _random(k, s, g).half() for k, s in sorted(shapes.items())}
    _atomic_save(tensors, path)
    return path


def motion_module_files():
    """(random v3-layout module, same module with zero proj_out); both full size, fp16."""
    rnd = CACHE / f"mm_v3_random_fp16_seed{SEED}.safetensors"
    zero = CACHE / f"mm_v3_zero_proj_out_fp16_seed{SEED}.safetensors"
    if rnd.is_file() and zero.is_file():
        return rnd, zero
    CACHE.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        layout = mm.MotionModuleSet(has_mid=False, pe_length=32)
    g = torch.Generator().manual_seed(SEED + 1)
    tensors = {}
    for k, v in layout.state_dict().items():
        if k.endswith(".pe"):
            tensors[k] = mm.sinusoidal_encoding(v.shape[1], v.shape[2]).half()
        else:
            tensors[k] = _random(k, list(v.shape), g).half()
    _atomic_save(tensors, rnd)
    for k in tensors:
        if ".proj_out." in k:
            tensors[k] = torch.zeros_like(tensors[k])
    _atomic_save(tensors, zero)
    return rnd, zero


def motion_lora_state(rank=8, seed=SEED + 2):
    """A MotionLoRA for all 21 v2 modules (mid block included, which the v3 module must skip)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layout = mm.MotionModuleSet(has_mid=True, pe_length=32)
    out = {}
    for name, m in layout.named_motion_modules():
        for a in (0, 1):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                base = f"{name}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}.processor.{proj}_lora"
                out[f"{base}.down.weight"] = (torch.randn(rank, m.dim, generator=g) / math.sqrt(m.dim)).half()
                out[f"{base}.up.weight"] = (torch.randn(m.dim, rank, generator=g) * 0.5 / math.sqrt(rank)).half()
    return out


def adapter_lora_state(rank=4, seed=SEED + 3):
    """An image-layer LoRA in the processor format of the v3 domain adapter (diffusers UNet names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block, c in (("down_blocks.0.attentions.0", 320), ("mid_block.attentions.0", 1280), ("up_blocks.3.attentions.2", 320)):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                cin = 768 if attn == "attn2" and proj in ("to_k", "to_v") else c
                base = f"{block}.transformer_blocks.0.{attn}.processor.{proj}_lora"
                out[f"{base}.down.weight"] = torch.randn(rank, cin, generator=g) / math.sqrt(cin)
                out[f"{base}.up.weight"] = torch.randn(c, rank, generator=g) * 0.5
    return out


def _link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


@pytest.fixture(scope="module")
def host(comfy):
    ckpt = sd15_checkpoint(comfy.comfy_path)
    rnd, zero = motion_module_files()
    _link(ckpt, comfy.models_dir / "checkpoints" / "sd15_random.safetensors")
    _link(rnd, comfy.models_dir / "animatediff_models" / "v3_sd15_mm_random.safetensors")
    _link(zero, comfy.models_dir / "animatediff_models" / "v3_sd15_mm_identity.safetensors")
    lora_dir = comfy.models_dir / "animatediff_motion_lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": motion_lora_state()}, str(lora_dir / "v2_lora_ZoomIn.ckpt"))
    loras = comfy.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": adapter_lora_state()}, str(loras / "v3_sd15_adapter.ckpt"))
    # wrong files for the error tests
    save_file({k: v for k, v in list(motion_lora_state(rank=2).items())}, str(comfy.models_dir / "animatediff_models" / "a_motion_lora.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(comfy.models_dir / "animatediff_models" / "an_sd_checkpoint.safetensors"))
    return comfy


def graph(frames=16, mm_name=None, lora=None, adapter=False, schedule="keep the model's", context_length=16,
          overlap=4, steps=1, cfg=2.0, prefix="ad", images=True, adapter_after=False):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red ball bouncing", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": frames}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"{prefix}_latent"}},
    }
    model = ["1", 0]
    if adapter:
        g["12"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": "v3_sd15_adapter.ckpt", "strength_model": 1.0}}
        model = ["12", 0]
    if mm_name:
        g["2"] = {"class_type": "CVGLoadMotionModule", "inputs": {"model_name": mm_name}}
        motion = ["2", 0]
        if lora:
            g["3"] = {"class_type": "CVGLoadMotionLoRA", "inputs": {"motion_module": motion, "lora_name": lora, "strength": 1.0}}
            motion = ["3", 0]
        g["4"] = {"class_type": "CVGApplyMotionModule", "inputs": {
            "model": model, "motion_module": motion, "motion_scale": 1.0, "beta_schedule": schedule,
            "context_length": context_length, "context_overlap": overlap, "closed_loop": False, "fuse_method": "pyramid"}}
        model = ["4", 0]
    if adapter_after:  # a native patch applied on top of the animated MODEL
        g["14"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": "v3_sd15_adapter.ckpt", "strength_model": 1.0}}
        model = ["14", 0]
    g["8"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}}
    if images:
        g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}}
        g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}}
    return g


def saved_latent(comfy, outputs, node="11"):
    entry = outputs[node]["latents"][0]
    path = comfy.output_dir / entry.get("subfolder", "") / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def test_end_to_end_16_frames_with_motion_lora_and_adapter(host):
    out = host.run(graph(mm_name="v3_sd15_mm_random.safetensors", lora="v2_lora_ZoomIn.ckpt", adapter=True,
                         schedule="sqrt_linear (AnimateDiff)", prefix="ad_e2e"), timeout=900)
    images = out["10"]["images"]
    assert len(images) == 16
    for im in images:
        assert (host.output_dir / im.get("subfolder", "") / im["filename"]).is_file()
    lat = saved_latent(host, out)
    assert lat.shape == (16, 4, 4, 4) and torch.isfinite(lat).all()
    log = host.log()
    assert "lora key not loaded" not in log, "the native LoRA loader did not recognise the adapter's keys"
    # frames differ from each other only through noise here; the motion module must not collapse them
    assert (lat[0] - lat[1]).abs().max() > 0


def test_identity_at_init_equals_plain_model(host):
    """Zero proj_out: the animated model's latent equals the plain model's exactly, frame by frame."""
    plain = saved_latent(host, host.run(graph(frames=8, prefix="ad_plain", images=False), timeout=900))
    ident = saved_latent(host, host.run(graph(frames=8, mm_name="v3_sd15_mm_identity.safetensors", prefix="ad_ident", images=False), timeout=900))
    assert plain.shape == ident.shape == (8, 4, 4, 4)
    assert torch.equal(plain, ident)


def test_context_windows_on_a_longer_clip(host):
    """12 frames in windows of 8 (overlap 2): the identity module still reproduces the plain model (the blend
    weights sum to one), and the random module, same graph otherwise, changes the result (the injection is
    active)."""
    plain = saved_latent(host, host.run(graph(frames=12, prefix="ad_plain12", images=False), timeout=900))
    ident = saved_latent(host, host.run(graph(frames=12, mm_name="v3_sd15_mm_identity.safetensors", context_length=8,
                                              overlap=2, prefix="ad_ctx_ident", images=False), timeout=900))
    assert torch.allclose(plain, ident, atol=1e-5, rtol=1e-5)
    # random module, with a native LoRA applied AFTER the motion module (it must patch the same UNet layers)
    moved = saved_latent(host, host.run(graph(frames=12, mm_name="v3_sd15_mm_random.safetensors", context_length=8,
                                              overlap=2, prefix="ad_ctx", images=False, adapter_after=True), timeout=900))
    assert moved.shape == (12, 4, 4, 4) and torch.isfinite(moved).all()
    assert (moved - plain).abs().max().item() > 1e-3
    assert "lora key not loaded" not in host.log()
    assert "could not patch" not in host.log() and "NOT LOADED" not in host.log()


def test_clear_errors(host):
    err = host.run_expect_error(graph(mm_name="a_motion_lora.safetensors", images=False))
    assert "this is a MotionLoRA, use CVG Load MotionLoRA" in err
    err = host.run_expect_error(graph(mm_name="an_sd_checkpoint.safetensors", images=False))
    assert "Stable Diffusion checkpoint" in err
    err = host.run_expect_error(graph(frames=40, mm_name="v3_sd15_mm_identity.safetensors", context_length=0, images=False))
    assert "positional encoding length 32" in err
    err = host.run_expect_error(graph(mm_name="v3_sd15_mm_identity.safetensors", context_length=40, images=False))
    assert "exceeds the positional-encoding length 32" in err
    twice = graph(mm_name="v3_sd15_mm_identity.safetensors", images=False)
    twice["13"] = {"class_type": "CVGApplyMotionModule", "inputs": dict(twice["4"]["inputs"], model=["4", 0])}
    twice["8"]["inputs"]["model"] = ["13", 0]
    err = host.run_expect_error(twice)
    assert "already has a motion module applied" in err


def test_nodes_registered(host):
    info = host.object_info()
    for node in ("CVGLoadMotionModule", "CVGLoadMotionLoRA", "CVGApplyMotionModule"):
        assert node in info
    assert info["CVGApplyMotionModule"]["output"] == ["MODEL"]
    assert not [line for line in host.import_failures() if "cvg" in line.lower()]
