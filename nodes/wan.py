"""Wan2.1 DiT nodes: CVG Load Wan Model, CVG Empty Video Latent, CVG Load Text Embeds, CVG Sampler.

Thin adapters: the model is models/wan/dit.py, loading models/wan/loading.py, the sampling loop
models/wan/pipeline.py (shared with the I2V and long-video nodes).
"""
import os
import re

import torch

from ..models import conditioning, long_video
from ..models import checkpoints
from ..models import sampling
from ..models.attention import BACKENDS
from ..models.wan import latent as wan_latent
from ..models.wan import loading, pipeline
from ..models.wan.dit import scaled_mm_unsupported
from ..models.wan.block_swap import BlockSwap, resident_bytes
from ..models.wan.step_cache import CachedModel, StepCache
from . import comfy_bridge
from . import multi_gpu as multi_gpu_node

WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32", loading.SCALED_MM]
COMPUTE_DTYPES = ["auto", "bf16", "fp16", "fp32"]

_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _wan_model_files():
    """diffusion_models files plus sharded diffusers/Wan-AI models (their *.index.json), shards hidden."""
    index = comfy_bridge.model_files_ending("diffusion_models", ".safetensors.index.json")
    sharded = {os.path.dirname(i) for i in index}
    files = [f for f in comfy_bridge.model_files("diffusion_models")
             if not (_SHARD.search(f) and os.path.dirname(f.replace(os.sep, "/")) in sharded)]
    return sorted(set(files) | set(index))


class CVGLoadWanModel:
    DESCRIPTION = (
        "Loads a Wan2.1 diffusion model (T2V-1.3B/14B, I2V-14B, FLF2V-14B; detected from the file) from the "
        "diffusion_models folder: original Wan-AI files, ComfyUI repackaged files (fp16/bf16/fp8, scaled fp8) "
        "and sharded diffusers / Wan-AI folders (pick their *.index.json). weight_dtype is how the weights are kept in memory ('default': "
        "as the file for fp8 files, the compute dtype otherwise; fp8 halves memory and is upcast per layer; "
        "fp8_e4m3fn_scaled_mm also multiplies in fp8 on GPUs with fp8 tensor cores — see its tooltip). "
        "attention: 'sdpa' (PyTorch, always available) or flash_attn / sageattention when installed. "
        "blocks_to_swap keeps the last N transformer blocks in CPU memory and copies each to the GPU just "
        "before it runs (prefetched on a side stream): 14B on smaller GPUs, at the cost of PCIe traffic."
    )
    CATEGORY = "CVG/wan"
    FUNCTION = "load"
    RETURN_TYPES = ("CVG_WAN",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (_wan_model_files(),),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip":
                    "how the transformer blocks' weights are kept: 'default' as the file for fp8 files, else the "
                    "compute dtype; fp8_e4m3fn / fp8_e5m2 store fp8 (half the memory of bf16) and upcast each layer "
                    "to the compute dtype. fp8_e4m3fn_scaled_mm stores e4m3 with one scale per weight (scaled fp8 "
                    "files kept as they are) and runs those matmuls in fp8 through torch._scaled_mm, activations "
                    "quantized per tensor: faster, slightly less exact. It needs fp8 tensor cores (NVIDIA compute "
                    "capability 8.9+: RTX 40/50, L4, L40, H100, H200); elsewhere the loader stops with an error "
                    "(a torch build with a CPU kernel runs it, slowly)."}),
                "attention": (list(BACKENDS), {"default": "sdpa"}),
            },
            "optional": {
                "compute_dtype": (COMPUTE_DTYPES, {"default": "auto"}),
                "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                    "keep this many of the last transformer blocks on the offload device (CPU) and move each in "
                    "just before use, prefetching the next one (0 = all blocks on the GPU; 14B has 40, 1.3B 30)"}),
            },
        }

    def load(self, model_name, weight_dtype, attention, compute_dtype="auto", blocks_to_swap=0):
        path = comfy_bridge.model_path("diffusion_models", model_name)
        load_device = comfy_bridge.torch_device()
        dtype = comfy_bridge.compute_dtype(compute_dtype, load_device)
        wd = None if weight_dtype == "default" else weight_dtype
        if weight_dtype == loading.SCALED_MM:
            problem = scaled_mm_unsupported(load_device)
            if problem:
                raise ValueError(
                    f"CVG Load Wan Model: weight_dtype {weight_dtype!r} multiplies in fp8, which needs fp8 tensor "
                    f"cores (NVIDIA compute capability 8.9+), but {problem}. Pick weight_dtype 'fp8_e4m3fn' (fp8 "
                    "storage, computed in the compute dtype) or 'default'.")
        try:
            model = loading.load_wan_dit(path, device=comfy_bridge.offload_device(), dtype=dtype, weight_dtype=wd,
                                         attention_backend=attention)
        except checkpoints.CheckpointError as e:
            raise ValueError(f"CVG Load Wan Model: {e}") from e
        # CVG_WAN_COMPILE=0 turns off the torch.compile'd elementwise groups (on by default on CUDA + Triton)
        if os.environ.get("CVG_WAN_COMPILE", "1").strip().lower() in ("0", "false", "off", "no"):
            model.fused = False
        blocks_to_swap = int(blocks_to_swap)
        if blocks_to_swap:
            layers = len(model.blocks)
            if blocks_to_swap > layers:
                raise ValueError(f"CVG Load Wan Model: blocks_to_swap is {blocks_to_swap} but {model_name!r} has "
                                 f"{layers} transformer blocks; use 0..{layers}")
            BlockSwap(model, blocks_to_swap, offload_device=comfy_bridge.offload_device())
        patcher = comfy_bridge.wrap_model(model, load_device=load_device)
        if blocks_to_swap:
            # ComfyUI plans its memory with the patcher's size: only the resident part goes to the load device
            patcher.size = resident_bytes(model)
        return (patcher,)


class CVGEmptyVideoLatent:
    DESCRIPTION = ("An empty Wan video LATENT (raw VAE space zeros) of [batch, 16, (length-1)/4+1, height/8, "
                   "width/8]; length must be 4k+1 (81 = 5 s at 16 fps).")
    CATEGORY = "CVG/wan"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 832, "min": 16, "max": 8192, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 8192, "step": 16}),
                "length": ("INT", {"default": 81, "min": 1, "max": 8193, "step": 4}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    def generate(self, width, height, length, batch_size):
        if width % 16 or height % 16:
            raise ValueError(f"width and height must be multiples of 16 (got {width}×{height}); e.g. 832×480")
        wan_latent.check_frame_count(length, "length")
        shape = (batch_size, wan_latent.LATENT_CHANNELS, wan_latent.latent_frames(length),
                 height // wan_latent.SPATIAL_STRIDE, width // wan_latent.SPATIAL_STRIDE)
        return ({"samples": torch.zeros(shape, device=comfy_bridge.intermediate_device())},)


def _embed_files():
    folder = comfy_bridge.input_directory()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


class CVGLoadTextEmbeds:
    DESCRIPTION = (
        "Loads precomputed text embeddings (e.g. umT5-XXL outputs [L, 4096] or [1, L, 4096]) from a "
        ".safetensors file in ComfyUI's input folder as CONDITIONING, for CVG Sampler. The file holds one "
        "tensor (or one named 'text_embeds'). Use it to reuse prompts without loading the 11 GB text encoder."
    )
    CATEGORY = "CVG/wan"
    FUNCTION = "load"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds": (_embed_files(),)}}

    def load(self, embeds):
        path = os.path.join(comfy_bridge.input_directory(), embeds)
        state = checkpoints.read_state_dict(path)
        if "text_embeds" in state:
            t = state["text_embeds"]
        elif len(state) == 1:
            t = next(iter(state.values()))
        else:
            raise ValueError(f"{embeds!r} holds {len(state)} tensors; expected one (or one named 'text_embeds')")
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise ValueError(f"{embeds!r}: text embeddings must be [L, D] or [B, L, D], found {list(t.shape)}")
        return ([[t.float(), {}]],)

    @classmethod
    def IS_CHANGED(cls, embeds):
        path = os.path.join(comfy_bridge.input_directory(), embeds)
        return os.path.getmtime(path) if os.path.exists(path) else ""


# Wan2.1 latent (normalised space) -> RGB in -1..1: ComfyUI's published latent2rgb factors for Wan 2.1.
_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
_RGB_BIAS = [-0.1835, -0.0868, -0.3360]


def latent_preview_image(denoised, frame=0):
    """A PIL image of one latent frame of the current x0 estimate (normalised space) [B,16,F,h,w]."""
    from PIL import Image

    z = denoised[0, :, min(frame, denoised.shape[2] - 1)].float().cpu()
    rgb = torch.einsum("chw,cr->hwr", z, torch.tensor(_RGB_FACTORS)) + torch.tensor(_RGB_BIAS)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb)


def _text(cond, what, text_dim):
    if not isinstance(cond, list) or not cond or not isinstance(cond[0], (list, tuple)):
        raise ValueError(f"{what} is not a CONDITIONING (expected [[tensor, options]])")
    if len(cond) > 1:
        raise ValueError(
            f"{what} holds {len(cond)} conditioning entries (e.g. from Conditioning Combine); CVG Sampler "
            "takes one prompt per input — encode a single prompt")
    tensor, options = cond[0][0], cond[0][1]
    return pipeline.text_tensor(tensor, text_dim, what), options


class CVGSampler:
    DESCRIPTION = (
        "Samples a Wan video with flow matching (the reference's σ grid and integer timesteps) and CFG: "
        "solver unipc (the reference default), euler or dpmpp_2m; shift 5 is the reference default (ComfyUI "
        "uses 8; 3 for I2V at 480p); denoise < 1 starts from the input latent (video-to-video). positive / "
        "negative: umT5 text (CLIPLoader type wan + CLIPTextEncode). For I2V/FLF2V models give the LATENT of "
        "CVG I2V Conditioner (or ComfyUI's WanImageToVideo conditioning). Output: LATENT in raw VAE space."
    )
    CATEGORY = "CVG/wan"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("CVG_WAN",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "solver": (list(sampling.SOLVERS), {"default": "unipc"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "frame_guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip":
                    "w of v = v_tu + cfg·(v_c − v_tu) + w·(v_c − v_fu): pushes away from the prediction without "
                    "the frame condition (mask 0, no condition latent; text kept). Needs an I2V/known-frame "
                    "LATENT. 0 skips the extra pass."}),
                "step_cache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "first-block step cache: on a step where the first block's residual changed by less than this "
                    "(relative L1, against the last fully computed step; cond and uncond decided separately) the "
                    "other blocks are skipped and their last residual reused. 0 = off (exact); ~0.05-0.15 trades "
                    "quality for fewer forwards."}),
                "batch_cfg": ("BOOLEAN", {"default": False, "tooltip":
                    "run the conditional and unconditional passes as one batch (faster on a GPU with memory to "
                    "spare; same result up to float rounding)"}),
                "multi_gpu": ("CVG_MULTI_GPU", {"tooltip":
                    "from CVG Multi-GPU: run the forwards on several GPUs (sequence / CFG parallel worker processes)"}),
            },
        }

    def sample(self, model, positive, negative, latent, seed, steps, cfg, shift, solver, denoise, frame_guidance=0.0,
               step_cache_threshold=0.0, batch_cfg=False, multi_gpu=None):
        if not hasattr(model, "model") or not hasattr(model.model, "config"):
            raise TypeError("CVG Sampler needs a CVG_WAN model from 'CVG Load Wan Model'")
        dit = model.model
        text_dim = dit.config.text_dim
        pos, pos_opts = _text(positive, "positive conditioning", text_dim)
        neg, _ = _text(negative, "negative conditioning", text_dim)
        z = latent["samples"]
        if z.ndim != 5 or z.shape[1] != wan_latent.LATENT_CHANNELS:
            raise ValueError(f"latent must be a Wan video LATENT [B, 16, T, H, W], got {list(z.shape)}; "
                             "use CVG Empty Video Latent or a Wan VAE encode")
        cond = conditioning.resolve_condition(latent, pos_opts)
        conditioning.check_model_condition(dit.config.in_dim, cond)
        if frame_guidance and cond is None:
            raise ValueError(
                f"frame_guidance {frame_guidance} needs a frame condition, but this LATENT carries none; give the "
                "LATENT of CVG I2V Conditioner (or native WanImageToVideo conditioning), or set frame_guidance to 0"
            )
        if multi_gpu is None:
            dit = comfy_bridge.load_to_device(model)
        else:
            dit = multi_gpu_node.prepare(model, multi_gpu, frame_guidance, step_cache_threshold, batch_cfg)
        device = dit.device
        y = clip_fea = None
        strength = 1.0
        if cond is not None:
            y = cond["y"].to(device)
            clip_fea = cond["clip_fea"].to(device) if cond["clip_fea"] is not None else None
            strength = float(cond.get("image_strength", 1.0))
        progress = comfy_bridge.Progress(steps)
        previews = comfy_bridge.preview_method() != "none"

        def callback(info):
            preview = None
            if previews and info.get("denoised") is not None:
                preview = ("JPEG", latent_preview_image(info["denoised"]), 512)
            progress.update(1, preview=preview)

        threshold = float(step_cache_threshold)
        if threshold < 0:
            raise ValueError(f"step_cache_threshold must be >= 0 (0 turns the cache off), got {threshold}")
        cache = StepCache(threshold) if threshold > 0 else None
        velocity_fn = None
        if frame_guidance:
            net = dit
            if cache is not None:  # one batched call per step (rows in a fixed order) or one call per pass
                net = CachedModel(dit, cache, stream_of=(lambda *a: "batch") if batch_cfg else None)
            velocity_fn = long_video.wan_velocity_fn(net, pos.to(device), neg.to(device), cfg_scale=cfg, y=y,
                                                     clip_fea=clip_fea, image_strength=strength,
                                                     frame_guidance=frame_guidance, batched=bool(batch_cfg))
        comfy_bridge.check_interrupt()
        if multi_gpu is not None:
            out = multi_gpu_node.sample(dit, multi_gpu, pos, neg, z, seed, callback=callback, steps=steps, cfg=cfg,
                                        shift=shift, solver=solver, denoise=denoise, y=y, clip_fea=clip_fea,
                                        image_strength=strength, batch_cfg=bool(batch_cfg))
            return ({"samples": out.to(comfy_bridge.intermediate_device())},)
        out = pipeline.sample_video(dit, pos.to(device), neg.to(device), z, seed, steps=steps, cfg=cfg, shift=shift,
                                    solver=solver, denoise=denoise, y=y, clip_fea=clip_fea, image_strength=strength,
                                    callback=callback, velocity_fn=velocity_fn, batch_cfg=bool(batch_cfg),
                                    step_cache=cache if velocity_fn is None else None)
        if cache is not None:
            print(f"CVG Sampler: {cache.summary()}")
        return ({"samples": out.to(comfy_bridge.intermediate_device())},)


NODE_CLASS_MAPPINGS = {
    "CVGLoadWanModel": CVGLoadWanModel,
    "CVGEmptyVideoLatent": CVGEmptyVideoLatent,
    "CVGLoadTextEmbeds": CVGLoadTextEmbeds,
    "CVGSampler": CVGSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CVGLoadWanModel": "CVG Load Wan Model",
    "CVGEmptyVideoLatent": "CVG Empty Video Latent",
    "CVGLoadTextEmbeds": "CVG Load Text Embeds",
    "CVGSampler": "CVG Sampler",
}
