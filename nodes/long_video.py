"""Long-video nodes (LVDM's techniques on Wan, REFERENCE §7): CVG Latent Perturber, CVG Extend Video,
CVG Long Video Sampler, CVG Keyframes, CVG Interpolator.

Thin adapters over models/long_video.py, models/conditioning.py and models/sampling.py. Known frames reach
the model through its mask channels for I2V/FLF2V checkpoints (in_dim 36) and by substitution into the
noisy latent at every step for T2V checkpoints (in_dim 16). Segments are sampled, decoded and emitted one
after another (frames go to the CPU), keeping only the condition frames the next segment needs.

Guidance: v = v_tu + g·(v_c − v_tu) + w·(v_c − v_fu), g = cfg (text), w = frame_guidance; v_fu keeps the
positive text but drops the frame condition (mask 0, no condition latent, no substitution); w = 0 skips
that pass. Seeds: segment i uses seed + i for its noise and seed + i + 7919 for the perturbation noise.
"""
import json

import torch

from ..models import conditioning
from ..models import long_video as LV
from ..models import sampling
from ..models.wan import latent as wan_latent
from . import comfy_bridge
from .vae import require_vae

SOLVERS = list(sampling.SOLVERS)
PERTURB_SEED_OFFSET = 7919
BATCH_PASSES = ("BOOLEAN", {"default": False, "tooltip": "run the cond / text-uncond / frame-uncond passes as one "
                                                        "batch (faster on a GPU with memory to spare)"})


# ------------------------------------------------------------------------------------------ helpers

def text_contexts(conditioning_value, what="positive"):
    """CONDITIONING → list of [1, L, D] tensors, one per entry and batch row (a prompt list)."""
    if not isinstance(conditioning_value, (list, tuple)) or not conditioning_value:
        raise ValueError(f"{what} must be a CONDITIONING (e.g. from CLIPTextEncode with a Wan umT5 CLIP)")
    out = []
    for entry in conditioning_value:
        t = entry[0]
        if not torch.is_tensor(t) or t.ndim != 3:
            raise ValueError(f"{what} conditioning entry is not a [B, L, D] tensor")
        out.extend(t[i:i + 1].float() for i in range(t.shape[0]))
    return out


def wan_model(model):
    """The WanDiT inside a CVG_WAN ModelPatcher, loaded on ComfyUI's device."""
    module = comfy_bridge.load_to_device(model) if hasattr(model, "model") else model
    if not hasattr(module, "config") or not hasattr(module.config, "in_dim"):
        raise TypeError(f"expected a CVG_WAN model (from 'CVG Load Wan Model'), got {type(module).__name__}")
    return module


def check_images(images, what):
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"{what} must be an IMAGE [frames, height, width, channels]")
    h, w = images.shape[1], images.shape[2]
    if h % 16 or w % 16:
        raise ValueError(f"{what} is {w}×{h}; Wan needs width and height that are multiples of 16 — resize or crop "
                         f"it first (e.g. to {w // 16 * 16}×{h // 16 * 16})")
    return images[..., :3].float().cpu()


def clip_encode(clip_vision, frames):
    """CLIP_VISION → penultimate hidden states for IMAGE frames (whole image, no crop, when supported)."""
    if clip_vision is None:
        return None
    try:
        out = clip_vision.encode_image(frames, crop=False)
    except TypeError:
        out = clip_vision.encode_image(frames)
    return out.penultimate_hidden_states


class SegmentSampler:
    """Samples one Wan segment given its known frames (IMAGE frames [H,W,C] 0..1 by local index)."""

    def __init__(self, model, vae, positive, negative, seed, steps, cfg, shift, solver, perturbation,
                 frame_guidance, height, width, clip_vision=None, image_strength=1.0, progress=None,
                 batched=False, prompt_list=False):
        self.model = wan_model(model)
        self.vae = require_vae(vae)
        prompts = text_contexts(positive)
        if len(prompts) > 1 and not prompt_list:
            raise ValueError(
                f"positive holds {len(prompts)} prompts (e.g. from Conditioning Combine); this node takes one prompt "
                f"for every segment — encode a single prompt, or use CVG Keyframes for a list of prompts")
        self.pos = prompts[0]
        self.neg = text_contexts(negative, "negative")[0] if negative is not None else None
        self.seed, self.steps, self.cfg, self.shift, self.solver = int(seed), int(steps), float(cfg), float(shift), solver
        self.s, self.w = float(perturbation), float(frame_guidance)
        self.h, self.wd = int(height), int(width)
        conditioning.check_pixel_size(self.h, self.wd)
        self.clip_vision = clip_vision
        self.strength = float(image_strength)
        self.progress = progress
        self.batched = batched
        self.has_mask = self.model.config.in_dim > wan_latent.LATENT_CHANNELS
        self.flf = getattr(self.model.config, "model_type", "") == "flf2v"

    def encode_images(self, frames):
        return self.vae.encode_images(frames).float().cpu()

    def __call__(self, seg, known, context=None):
        ctx = self.pos if context is None else context
        t_lat = wan_latent.latent_frames(seg.length)
        shape = (1, wan_latent.LATENT_CHANNELS, t_lat, self.h // 8, self.wd // 8)
        device = self.model.device
        seed = self.seed + seg.index
        noise = sampling.seeded_noise(shape, seed).to(device)
        y = clip_fea = sub = None
        strength = self.strength
        if self.has_mask:
            frames = {k: conditioning.images_to_model(f)[0] for k, f in known.items()}
            if frames:
                y = conditioning.build_condition(lambda v: self.encode_images((v[0].permute(1, 2, 3, 0) + 1) * 0.5),
                                                 frames, seg.length, self.h, self.wd)
                y = conditioning.perturb_condition(y, self.s, seed + PERTURB_SEED_OFFSET)
            else:
                y = torch.zeros(1, 20, *shape[2:])
            ks = sorted(known)
            if self.clip_vision is not None and ks:
                picks = [ks[0], ks[-1]] if self.flf else [ks[0]]
                clip_fea = conditioning.clip_features(*[clip_encode(self.clip_vision, known[k][None]) for k in picks])
                clip_fea = clip_fea.to(device)
            else:
                strength = 0.0
            y = y.to(device)
        elif known:
            raw, known_lat = LV.substitution_condition(self.encode_images, known, seg.length)
            cond = LV.perturb(wan_latent.normalize(raw), self.s, seed + PERTURB_SEED_OFFSET).to(device)
            sub = LV.FrameSubstitution(cond, known_lat, level=self.s, noise=noise)
        w = self.w if (y is not None and known) or sub is not None else 0.0
        fn = LV.wan_velocity_fn(self.model, ctx.to(device), self.neg.to(device) if self.neg is not None else None,
                                cfg_scale=self.cfg, y=y, clip_fea=clip_fea, image_strength=strength,
                                frame_guidance=w, substitution=sub, batched=self.batched)
        sigmas = sampling.wan_sigmas(self.steps, self.shift, self.solver)
        progress = self.progress

        def callback(_info):
            if progress is not None:
                progress.update(1)
            else:
                comfy_bridge.check_interrupt()

        with comfy_bridge.no_grad():
            x = sampling.sample(fn, noise.clone(), sigmas, self.solver, callback=callback)
            if sub is not None:
                x = sub.finalize(x)
        return wan_latent.denormalize(x.float()).cpu()

    def decode(self, z_raw):
        with comfy_bridge.no_grad():
            return self.vae.decode_to_images(z_raw).float().cpu()


def sampler_inputs():
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        "steps": ("INT", {"default": 30, "min": 1, "max": 200}),
        "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1}),
        "shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 30.0, "step": 0.1}),
        "solver": (SOLVERS, {"default": "unipc"}),
    }


def lvdm_inputs():
    return {
        "perturbation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01}),
        "frame_guidance": ("FLOAT", {"default": 0.0, "min": -5.0, "max": 10.0, "step": 0.05}),
        "color_anchor": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05}),
    }


def _metrics_json(results):
    return json.dumps([{"segment": r.index, "frames": r.frames_emitted,
                        "seam_error": None if r.seam_error != r.seam_error else r.seam_error,
                        "lab_mean": r.lab_mean, "lab_std": r.lab_std} for r in results])


def run_plan(sampler, plan, given, color_anchor=0.0, paste_known=False, contexts=None):
    chunks = []
    results = LV.generate_long(
        plan,
        (lambda seg, known: sampler(seg, known, contexts[seg.index] if contexts else None)),
        sampler.decode,
        lambda frames, seg: chunks.append(frames.cpu()),
        given_frames=given, color_anchoring=float(color_anchor), paste_known=paste_known,
        metrics_hook=lambda r, f: None)
    return torch.cat(chunks, dim=0), results


# ------------------------------------------------------------------------------------------- nodes

class CVGLatentPerturber:
    DESCRIPTION = (
        "Conditional latent perturbation (LVDM): z_s = (1 − s)·z + s·ε, ε ~ N(0, I) from the seed (CPU generator), "
        "s in σ units (0–1), applied once in the DiT's normalised space. On a LATENT from CVG I2V Conditioner it "
        "noises the condition latent of the known frames (the mask is kept) and records s; on a plain LATENT it "
        "noises the whole latent (returned in raw VAE space). The sampler then holds z_s fixed as the condition; "
        "with substitution (T2V) known frames never go below level s.")
    CATEGORY = "CVG/long_video"
    FUNCTION = "perturb"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT",),
            "level": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.99, "step": 0.01}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }}

    def perturb(self, latent, level, seed):
        out = dict(latent)
        entry = latent.get(conditioning.COND_KEY)
        if entry is not None:
            entry = dict(entry)
            entry["y"] = conditioning.perturb_condition(entry["y"], float(level), int(seed))
            entry["noise_level"] = float(level)
            out[conditioning.COND_KEY] = entry
        else:
            z = wan_latent.normalize(latent["samples"].float())
            out["samples"] = wan_latent.denormalize(LV.perturb(z, float(level), int(seed)))
            out["cvg_noise_level"] = float(level)
        return (out,)


class CVGExtendVideo:
    DESCRIPTION = (
        "Extend a video by one segment (chainable): the new segment of segment_length frames is conditioned on "
        "the last overlap_frames frames of the input, re-encoded as the start of a clip (the Wan VAE is causal), "
        "through the mask channels (I2V/FLF2V models) or by substitution into the noisy latent at every step "
        "(T2V models). Output: the input frames followed by segment_length − overlap_frames new frames. "
        "perturbation s: z_s = (1 − s)·z + s·ε on the condition once per segment; frame_guidance w: "
        "v = v_tu + cfg·(v_c − v_tu) + w·(v_c − v_fu); color_anchor: LAB mean/std matching to the condition "
        "frames (0 = off).")
    CATEGORY = "CVG/long_video"
    FUNCTION = "extend"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "metrics")

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("CVG_WAN",), "vae": ("CVG_VAE",), "positive": ("CONDITIONING",),
               "negative": ("CONDITIONING",), "images": ("IMAGE",)}
        req.update(sampler_inputs())
        req["segment_length"] = ("INT", {"default": 81, "min": 5, "max": 1025, "step": 4})
        req["overlap_frames"] = ("INT", {"default": 5, "min": 1, "max": 1021, "step": 4})
        req.update(lvdm_inputs())
        return {"required": req, "optional": {"clip_vision": ("CLIP_VISION",), "batch_passes": BATCH_PASSES}}

    def extend(self, model, vae, positive, negative, images, seed, steps, cfg, shift, solver, segment_length,
               overlap_frames, perturbation, frame_guidance, color_anchor, clip_vision=None, batch_passes=False):
        images = check_images(images, "images")
        n = images.shape[0]
        plan = LV.plan_extension(1, segment_length, overlap_frames, initial_frames=n)
        progress = comfy_bridge.Progress(steps)
        sampler = SegmentSampler(model, vae, positive, negative, seed, steps, cfg, shift, solver, perturbation,
                                 frame_guidance, images.shape[1], images.shape[2], clip_vision, progress=progress,
                                 batched=bool(batch_passes))
        given = {g: images[g] for g in plan[0].known_global}
        new, results = run_plan(sampler, plan, given, color_anchor)
        return (torch.cat([images, new], dim=0), _metrics_json(results))


class CVGLongVideoSampler:
    DESCRIPTION = (
        "Autoregressive long video in one node: segment 0 is text-to-video (or conditioned on start_images), each "
        "later segment is conditioned on the last overlap_frames frames generated so far and appended without "
        "the overlap. Total frames: segment_length + (num_segments − 1)·(segment_length − overlap_frames) "
        "(without start_images). Segments are sampled and decoded one after another (flat memory). Same "
        "perturbation / frame_guidance / color_anchor options as CVG Extend Video; the metrics output is a JSON "
        "list with each segment's seam error and LAB statistics (for drift measurements).")
    CATEGORY = "CVG/long_video"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "metrics")

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("CVG_WAN",), "vae": ("CVG_VAE",), "positive": ("CONDITIONING",),
               "negative": ("CONDITIONING",),
               "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
               "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
               "num_segments": ("INT", {"default": 3, "min": 1, "max": 1000})}
        req.update(sampler_inputs())
        req["segment_length"] = ("INT", {"default": 81, "min": 5, "max": 1025, "step": 4})
        req["overlap_frames"] = ("INT", {"default": 5, "min": 1, "max": 1021, "step": 4})
        req.update(lvdm_inputs())
        return {"required": req, "optional": {"start_images": ("IMAGE",), "clip_vision": ("CLIP_VISION",),
                                              "batch_passes": BATCH_PASSES}}

    def generate(self, model, vae, positive, negative, width, height, num_segments, seed, steps, cfg, shift, solver,
                 segment_length, overlap_frames, perturbation, frame_guidance, color_anchor, start_images=None,
                 clip_vision=None, batch_passes=False):
        given = {}
        if start_images is not None:
            start_images = check_images(start_images, "start_images")
            if tuple(start_images.shape[1:3]) != (height, width):
                raise ValueError(f"start_images are {start_images.shape[2]}×{start_images.shape[1]} but width×height is "
                                 f"{width}×{height}; make them match")
            n = start_images.shape[0]
            plan = LV.plan_extension(num_segments, segment_length, overlap_frames, initial_frames=n)
            given = {g: start_images[g] for g in plan[0].known_global}
        else:
            plan = LV.plan_extension(num_segments, segment_length, overlap_frames)
        progress = comfy_bridge.Progress(steps * len(plan))
        sampler = SegmentSampler(model, vae, positive, negative, seed, steps, cfg, shift, solver, perturbation,
                                 frame_guidance, height, width, clip_vision, progress=progress,
                                 batched=bool(batch_passes))
        frames, results = run_plan(sampler, plan, given, color_anchor)
        if start_images is not None:
            frames = torch.cat([start_images, frames], dim=0)
        return (frames, _metrics_json(results))


class CVGKeyframes:
    DESCRIPTION = (
        "Sparse keyframes for hierarchical generation. from_images: every every_nth frame of the given images (a "
        "user's stills, or a generated clip for temporal upsampling). from_prompts: one frame per prompt of the "
        "positive CONDITIONING (each entry / batch row is a prompt, e.g. ConditioningCombine of several "
        "CLIPTextEncode), generated by the DiT at length 1 (text-to-image), seeds seed, seed+1, …")
    CATEGORY = "CVG/long_video"
    FUNCTION = "keyframes"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("keyframes",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {"mode": (["from_images", "from_prompts"],),
               "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000}),
               "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
               "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16})}
        req.update(sampler_inputs())
        return {"required": req, "optional": {"images": ("IMAGE",), "model": ("CVG_WAN",), "vae": ("CVG_VAE",),
                                              "positive": ("CONDITIONING",), "negative": ("CONDITIONING",)}}

    def keyframes(self, mode, every_nth, width, height, seed, steps, cfg, shift, solver, images=None, model=None,
                  vae=None, positive=None, negative=None):
        if mode == "from_images":
            if images is None:
                raise ValueError("mode from_images needs the images input connected")
            return (images[::int(every_nth)].float(),)
        missing = [n for n, v in (("model", model), ("vae", vae), ("positive", positive)) if v is None]
        if missing:
            raise ValueError(f"mode from_prompts needs {', '.join(missing)} connected")
        if cfg != 1.0 and negative is None:
            raise ValueError("cfg != 1 needs the negative conditioning connected (or set cfg to 1)")
        prompts = text_contexts(positive)
        progress = comfy_bridge.Progress(steps * len(prompts))
        sampler = SegmentSampler(model, vae, positive, negative, seed, steps, cfg, shift, solver, 0.0, 0.0,
                                 height, width, progress=progress, prompt_list=True)
        out = []
        for i, ctx in enumerate(prompts):
            seg = LV.Segment(i, 0, 1, (), (0, 1), "unconditional")
            out.append(sampler.decode(sampler(seg, {}, context=ctx))[:1])
        return (torch.cat(out, dim=0)[..., :3],)


class CVGInterpolator:
    DESCRIPTION = (
        "Fill frames_between frames between each pair of consecutive keyframes with first-last-frame conditioning "
        "(FLF2V models; I2V models through the mask channels; T2V models by substituting the first keyframe "
        "exactly and the last approximately). Segments are 4k+1 long: frames_between = 3 (×4) spans one gap, "
        "frames_between = 1 (×2) two gaps with the middle keyframe known too. Output: (K−1)·(frames_between+1)+1 "
        "frames, each keyframe once, in place (keep_keyframes pastes the exact keyframe pixels back).")
    CATEGORY = "CVG/long_video"
    FUNCTION = "interpolate"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "metrics")

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("CVG_WAN",), "vae": ("CVG_VAE",), "positive": ("CONDITIONING",),
               "negative": ("CONDITIONING",), "keyframes": ("IMAGE",),
               "frames_between": ("INT", {"default": 3, "min": 1, "max": 255})}
        req.update(sampler_inputs())
        req.update(lvdm_inputs())
        req["keep_keyframes"] = ("BOOLEAN", {"default": True})
        return {"required": req, "optional": {"clip_vision": ("CLIP_VISION",), "batch_passes": BATCH_PASSES}}

    def interpolate(self, model, vae, positive, negative, keyframes, frames_between, seed, steps, cfg, shift, solver,
                    perturbation, frame_guidance, color_anchor, keep_keyframes, clip_vision=None, batch_passes=False):
        keyframes = check_images(keyframes, "keyframes")
        plan = LV.plan_interpolation(keyframes.shape[0], frames_between)
        step = int(frames_between) + 1
        given = {j * step: keyframes[j] for j in range(keyframes.shape[0])}
        progress = comfy_bridge.Progress(steps * len(plan))
        sampler = SegmentSampler(model, vae, positive, negative, seed, steps, cfg, shift, solver, perturbation,
                                 frame_guidance, keyframes.shape[1], keyframes.shape[2], clip_vision,
                                 progress=progress, batched=bool(batch_passes))
        frames, results = run_plan(sampler, plan, given, color_anchor, paste_known=bool(keep_keyframes))
        return (frames, _metrics_json(results))


NODE_CLASS_MAPPINGS = {
    "CVGLatentPerturber": CVGLatentPerturber,
    "CVGExtendVideo": CVGExtendVideo,
    "CVGLongVideoSampler": CVGLongVideoSampler,
    "CVGKeyframes": CVGKeyframes,
    "CVGInterpolator": CVGInterpolator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CVGLatentPerturber": "CVG Latent Perturber",
    "CVGExtendVideo": "CVG Extend Video",
    "CVGLongVideoSampler": "CVG Long Video Sampler",
    "CVGKeyframes": "CVG Keyframes",
    "CVGInterpolator": "CVG Interpolator",
}
