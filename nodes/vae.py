"""Wan-VAE nodes: CVG Load VAE, CVG VAE Encode, CVG VAE Decode, and `CVGVae` (the CVG_VAE value).

Thin adapters around models/wan/vae.py (model + streaming), models/wan/vae_loading.py (files) and
models/tiling.py (spatial tiles). LATENT holds raw VAE space, like ComfyUI's native Wan latents.
"""
import torch

from ..models import tiling as tiles
from ..models.wan import latent as wan_latent
from ..models.wan import vae_loading
from . import comfy_bridge

DTYPES = ["auto", "bf16", "fp16", "fp32"]
DEVICES = ["auto", "cpu"]
TILING_MODES = ["auto", "off", "manual"]


def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] < 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected IMAGE frames [T,H,W,3] in 0..1, got {shape}")
    t, h, w = images.shape[:3]
    wan_latent.check_frame_count(t, "IMAGE frame count")
    if h % 8 or w % 8:
        def near(v):
            lo = max(8, v // 8 * 8)
            return f"{lo} or {lo + 8}" if v % 8 else str(v)
        raise ValueError(
            f"frame size {w}×{h} (W×H) is not a multiple of 8; the Wan VAE needs both sides divisible by 8: "
            f"use width {near(w)} and height {near(h)} (resize or crop the frames first)"
        )


def _check_latent(z, channels):
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != channels:
        shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(
            f"expected a Wan video LATENT [B,{channels},T,H,W] (raw VAE space), got {shape}; connect a latent "
            "from CVG VAE Encode, a CVG sampler or a native Wan latent, not an image latent"
        )


class CVGVae:
    """The CVG_VAE value: a WanVAE wrapped in a ModelPatcher so ComfyUI can load and offload it."""

    def __init__(self, model, name="", load_device=None, offload_device=None):
        self.name = name
        self.config = model.config
        self.latent_channels = model.z_dim
        self.spatial_stride = model.spatial_stride
        self.temporal_stride = model.temporal_stride
        self.dtype = model.dtype
        self.patcher = comfy_bridge.wrap_model(model, load_device, offload_device)
        self.load_device = self.patcher.load_device

    # ---- device handling --------------------------------------------------------------------------
    def model(self, pixels=0):
        """The WanVAE on its load device (ComfyUI frees room for it and `pixels` output pixels)."""
        module = self.patcher.model
        need = int(tiles.decode_bytes_per_pixel(module) * pixels)
        module = comfy_bridge.load_to_device_with_memory(self.patcher, need)
        device = torch.device(self.load_device)
        if any(p.device != device for p in module.parameters()):
            module.to(device)  # a partial (low-VRAM) load: the VAE is small, keep it whole
        return module

    # ---- encoding ---------------------------------------------------------------------------------
    def encode_images(self, images, tiling="auto", tile_size=None, overlap=None):
        """IMAGE [T,H,W,C] in 0..1 (T = 4k+1, H and W multiples of 8) -> raw latent [1,16,t,h,w] float32
        on ComfyUI's intermediate device. Frames move to the GPU chunk by chunk (1, 4, 4, …) with the
        causal cache carried; 'auto' tiles spatially only when whole frames do not fit in free memory
        (or on out-of-memory), like the decoder."""
        _check_images(images)
        t, hp, wp = images.shape[:3]
        s = self.spatial_stride
        h, w = hp // s, wp // s
        model = self.model(hp * wp)
        tile, ov = self._tile((h, w), tiling, tile_size, overlap)
        chosen = tile if tile is not None else tiles.auto_tile(model, h, w)
        n_chunks = 1 + (t - 1) // 4
        bar = [comfy_bridge.Progress(n_chunks * len(tiles.TilePlan(h, w, *(chosen or (h, w)), ov, scale=1)))]

        def retry(new_tile):
            bar[0] = comfy_bridge.Progress(n_chunks * len(tiles.TilePlan(h, w, *new_tile, ov, scale=1)))

        def step(n):
            bar[0].update(n)

        def source(s0, s1, y0, y1, x0, x1):
            x = images[s0:s1, y0:y1, x0:x1, :3].to(model.device, torch.float32)
            return (x * 2.0 - 1.0).to(model.dtype).permute(3, 0, 1, 2).unsqueeze(0)

        shape = (1, t, hp, wp)
        with torch.inference_mode():
            if tiling == "off":
                z = tiles.encode_tiled(model, source, (h, w), ov, shape, step)
            else:
                z = tiles.encode_auto(model, source, shape, chosen, ov, step, on_retry=retry)
        return z.to(comfy_bridge.intermediate_device(), torch.float32)

    # ---- decoding ---------------------------------------------------------------------------------
    def _tile(self, size, mode, tile_size, overlap):
        """(tile in latent px or None for auto, overlap in latent px) for a tiling mode; size = latent (h, w)."""
        h, w = size
        ov = tiles.DEFAULT_OVERLAP if overlap is None else max(0, int(overlap) // self.spatial_stride)
        if mode == "off":
            return (h, w), ov
        if mode == "manual":
            if not tile_size:
                raise ValueError("tiling 'manual' needs a tile_size (pixels)")
            t = max(1, int(tile_size) // self.spatial_stride)
            if ov >= t:
                raise ValueError(f"tile_overlap {overlap} px must be smaller than tile_size {tile_size} px")
            return (t, t), ov
        if mode == "auto":
            return None, ov
        raise ValueError(f"tiling must be one of {TILING_MODES}, got {mode!r}")

    def decode_to_images(self, z_raw, tiling="auto", tile_size=None, overlap=None):
        """raw latent [B,16,T,h,w] -> IMAGE [B·(1+4(T-1)),8h,8w,3] float32 in 0..1 on the intermediate
        device. Tiles are decoded one at a time (tile-major), so GPU memory is one tile's worth."""
        _check_latent(z_raw, self.latent_channels)
        b, _, t, h, w = z_raw.shape
        model = self.model(h * w * self.spatial_stride ** 2)
        tile, ov = self._tile((h, w), tiling, tile_size, overlap)
        out_device = comfy_bridge.intermediate_device()
        frames = []
        with torch.inference_mode():
            for i in range(b):
                chosen = tile if tile is not None else tiles.auto_tile(model, h, w)
                plan = tiles.TilePlan(h, w, *(chosen or (h, w)), ov, self.spatial_stride)
                bar = [comfy_bridge.Progress(t * len(plan))]

                def retry(new_tile, bar=bar):
                    plan = tiles.TilePlan(h, w, *new_tile, ov, self.spatial_stride)
                    bar[0] = comfy_bridge.Progress(t * len(plan))

                def step(n, bar=bar):
                    bar[0].update(n)

                zb = z_raw[i:i + 1]
                if tiling == "off":
                    video = tiles.decode_tiled(model, zb, (h, w), ov, out_device, torch.float32, step)
                else:
                    video = tiles.decode_auto(model, zb, chosen, ov, out_device, torch.float32, step,
                                               on_retry=retry)
                frames.append(_to_images(video))
                del video
        return frames[0] if b == 1 else torch.cat(frames, 0)

    def iter_decode_images(self, z_raw, tiling="auto", tile_size=None, overlap=None):
        """Yield IMAGE chunks [n,8h,8w,3] float32 in 0..1 on the CPU as they are decoded (1 frame, then 4
        per latent frame), all tiles advancing together: memory stays flat in the clip length."""
        _check_latent(z_raw, self.latent_channels)
        b, _, t, h, w = z_raw.shape
        model = self.model(h * w * self.spatial_stride ** 2)
        tile, ov = self._tile((h, w), tiling, tile_size, overlap)
        for i in range(b):
            progress = comfy_bridge.Progress(t)
            with torch.inference_mode():
                zb = z_raw[i:i + 1]
                if tiling == "off":
                    it = tiles.iter_decode_tiled(model, zb, (h, w), ov, "cpu", torch.float32)
                else:
                    it = tiles.iter_decode_auto(model, zb, tile, ov, "cpu", torch.float32)
                for chunk in it:
                    images = _to_images(chunk)
                    del chunk
                    progress.update(1)
                    yield images

    def decode(self, z_raw):
        """Alias of decode_to_images with automatic tiling."""
        return self.decode_to_images(z_raw)


def _to_images(video):
    """[1,3,T,H,W] in -1..1 -> [T,H,W,3] in 0..1 (float32)."""
    return ((video[0].float().permute(1, 2, 3, 0) + 1.0) * 0.5).clamp_(0.0, 1.0).contiguous()


class CVGLoadVAE:
    DESCRIPTION = (
        "Loads the Wan2.1 VAE from the vae folder: wan_2.1_vae.safetensors (ComfyUI), Wan2.1_VAE.pth "
        "(original, read weights-only) or a diffusers AutoencoderKLWan file; fp32/bf16/fp16 weights. dtype is "
        "the compute dtype ('auto': bf16 on a GPU, fp32 on the CPU); device 'auto' lets ComfyUI load it on the "
        "GPU and offload it when memory is needed."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (comfy_bridge.model_files("vae"),),
                "dtype": (DTYPES, {"default": "auto"}),
                "device": (DEVICES, {"default": "auto"}),
            }
        }

    RETURN_TYPES = ("CVG_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = "CVG/vae"

    def load(self, vae_name, dtype="auto", device="auto"):
        path = comfy_bridge.model_path("vae", vae_name)
        if device == "cpu":
            load_device = offload = torch.device("cpu")
        else:
            load_device, offload = comfy_bridge.torch_device(), comfy_bridge.offload_device()
        compute = comfy_bridge.compute_dtype(dtype, load_device)
        model = vae_loading.load_wan_vae(path, dtype=compute, device=offload)
        if torch.device(load_device).type == "cuda":
            model.set_channels_last(True)
        return (CVGVae(model, vae_name, load_device, offload),)


class CVGVAEEncode:
    DESCRIPTION = (
        "Encodes IMAGE frames [T,H,W,C] into a Wan LATENT [1,16,(T-1)/4+1,H/8,W/8] (raw VAE space, "
        "interchangeable with native Wan latents). T must be 4k+1 and H, W multiples of 8: other inputs get an "
        "error naming the nearest valid values (nothing is dropped silently). Frames are streamed in chunks "
        "of 1, 4, 4, … with the causal cache carried, so memory does not grow with the clip length."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("CVG_VAE",), "images": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "CVG/vae"

    def encode(self, vae, images):
        require_vae(vae)
        return ({"samples": vae.encode_images(images)},)


class CVGVAEDecode:
    DESCRIPTION = (
        "Decodes a Wan LATENT (raw VAE space) into IMAGE frames, one latent frame at a time with the causal "
        "cache carried (exact: the same result as decoding the whole clip). tiling: 'auto' decodes whole "
        "frames when they fit in free memory and otherwise spatial tiles (retrying with smaller tiles on "
        "out-of-memory); 'off' never tiles; 'manual' uses tile_size / tile_overlap (pixels). Tiles are blended "
        "with linear feathering."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("CVG_VAE",),
                "samples": ("LATENT",),
                "tiling": (TILING_MODES, {"default": "auto"}),
                "tile_size": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8}),
                "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "CVG/vae"

    def decode(self, vae, samples, tiling="auto", tile_size=512, tile_overlap=64):
        require_vae(vae)
        z = samples["samples"] if isinstance(samples, dict) else samples
        return (vae.decode_to_images(z, tiling, tile_size, tile_overlap),)


def require_vae(vae):
    """The CVG_VAE value itself, or a clear error for anything else wired into a vae input."""
    if not isinstance(vae, CVGVae) and not all(hasattr(vae, m) for m in ("encode_images", "decode_to_images")):
        raise TypeError(f"expected a CVG_VAE (from 'CVG Load VAE'), got {type(vae).__name__}")
    return vae


NODE_CLASS_MAPPINGS = {
    "CVGLoadVAE": CVGLoadVAE,
    "CVGVAEEncode": CVGVAEEncode,
    "CVGVAEDecode": CVGVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CVGLoadVAE": "CVG Load VAE",
    "CVGVAEEncode": "CVG VAE Encode",
    "CVGVAEDecode": "CVG VAE Decode",
}
