"""CVG I2V Conditioner: image-to-video and first-last-frame conditioning for Wan I2V / FLF2V models.

Output design: a LATENT whose "samples" is the zero starting latent (raw VAE space, [1,16,T,h,w]) and whose
extra key "cvg_cond" carries the condition (see models/conditioning.py): y = [mask 4 ; condition latent 16]
in the DiT's space, the CLIP-vision features, the image strength λ and the noise level of the condition.
Samplers read it with ``models.conditioning.resolve_condition(latent, positive_options)``, which also
accepts ComfyUI's native WanImageToVideo / WanFirstLastFrameToVideo conditioning.
"""
from ..models import conditioning
from ..models.wan import latent as wan_latent
from . import comfy_bridge
from .vae import require_vae


def vae_encoder(vae):
    """``encode(video [1,3,F,H,W] in −1..1) -> raw latent`` through a CVG_VAE (``encode_images`` takes
    IMAGE frames in 0..1)."""
    require_vae(vae)

    def encode(video):
        images = ((video[0].permute(1, 2, 3, 0) + 1.0) * 0.5)
        return vae.encode_images(images).float().cpu()
    return encode


def prepare_frames(images, height, width, what):
    """IMAGE [n,H,W,C] → list of [3,height,width] frames in −1..1, bicubic-resized as the reference."""
    x = conditioning.images_to_model(images)
    return list(conditioning.resize_image_bicubic(x, height, width))


def build_i2v_latent(vae, start_image, width, height, length, image_strength=1.0, noise_augmentation=0.0,
                     seed=0, end_image=None, clip_start=None, clip_end=None):
    conditioning.check_pixel_size(height, width)
    wan_latent.check_frame_count(length, "length")
    frames = {}
    if start_image is not None:
        for k, f in enumerate(prepare_frames(start_image, height, width, "start_image")):
            frames[k] = f
    if end_image is not None:
        ends = prepare_frames(end_image, height, width, "end_image")
        for k, f in enumerate(ends):
            frames[length - len(ends) + k] = f
    if not frames:
        raise ValueError("give a start_image (and optionally an end_image)")
    if len(frames) > length or (start_image is not None and end_image is not None
                                and start_image.shape[0] + end_image.shape[0] > length):
        raise ValueError(f"{len(frames)} known frames do not fit in a video of {length} frames; raise the length")
    with comfy_bridge.no_grad():
        y = conditioning.build_condition(vae_encoder(vae), frames, length, height, width)
    y = conditioning.perturb_condition(y, float(noise_augmentation), int(seed))
    clip_fea = conditioning.clip_features(clip_start, clip_end)
    t_lat = wan_latent.latent_frames(length)
    samples = y.new_zeros(1, wan_latent.LATENT_CHANNELS, t_lat, height // 8, width // 8)
    entry = conditioning.make_condition_entry(y, clip_fea, image_strength, sorted(frames), length,
                                              float(noise_augmentation))
    return {"samples": samples, conditioning.COND_KEY: entry}


class CVGI2VConditioner:
    DESCRIPTION = (
        "Image-to-video / first-last-frame conditioning for Wan I2V and FLF2V models (REFERENCE §2). The start "
        "image (all its frames, from frame 0) and the optional end image (at the end) are bicubic-resized to "
        "width×height, placed in an otherwise mid-grey video, VAE-encoded and normalised; the 4-channel mask "
        "marks the known frames. noise_augmentation s perturbs the condition latent of the known frames once: "
        "z_s = (1 − s)·z + s·ε (ε from seed). image_strength λ scales the CLIP image branch of the DiT (1 = "
        "released behaviour, 0 = off). Connect CLIPVisionEncode (clip_vision_h, crop none) outputs of the start "
        "and, for FLF2V, the end image. Output: a LATENT carrying the condition, for CVG Sampler.")
    CATEGORY = "CVG/i2v"
    FUNCTION = "condition"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("CVG_VAE",),
                "start_image": ("IMAGE",),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
                "length": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4}),
                "image_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05}),
                "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            },
            "optional": {
                "end_image": ("IMAGE",),
                "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                "clip_vision_output_end": ("CLIP_VISION_OUTPUT",),
            },
        }

    def condition(self, vae, start_image, width, height, length, image_strength, noise_augmentation, seed,
                  end_image=None, clip_vision_output=None, clip_vision_output_end=None):
        if clip_vision_output_end is not None and end_image is None:
            raise ValueError("clip_vision_output_end was connected without an end_image; connect the end image too")
        latent = build_i2v_latent(vae, start_image, width, height, length, image_strength, noise_augmentation,
                                  seed, end_image, clip_vision_output, clip_vision_output_end)
        return (latent,)


NODE_CLASS_MAPPINGS = {"CVGI2VConditioner": CVGI2VConditioner}
NODE_DISPLAY_NAME_MAPPINGS = {"CVGI2VConditioner": "CVG I2V Conditioner"}
