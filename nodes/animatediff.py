"""AnimateDiff nodes: load a motion module, chain MotionLoRAs onto it, apply it to a native SD1.5 MODEL.

The motion modules are injected into a CLONE of the ModelPatcher through APIs that exist in every supported
ComfyUI version:
  * object patches (`add_object_patch`) replace the 21 UNet blocks that get a motion module by new blocks
    that hold the SAME layers plus the motion module, so ComfyUI's memory manager moves the motion modules
    with the UNet when it patches / loads the model, and restores the original blocks when it unpatches;
  * the model function wrapper (`set_model_unet_function_wrapper`) learns the number of frames of each UNet
    call (batch / number of cond-uncond chunks in `cond_or_uncond`) and runs long clips in sliding context
    windows; an existing wrapper is chained, not replaced;
  * the β schedule override replaces `model_sampling` by a copy with the new schedule (object patch).
The original MODEL and the loaded motion module are never modified.
"""
import copy

from ..models.animatediff import context
from ..models.animatediff import loading
from ..models.animatediff import lora as motion_lora
from ..models.animatediff import motion_module as mm
from ..models.checkpoints import CheckpointError
from . import comfy_bridge

CATEGORY = "CVG/animatediff"
BETA_SCHEDULES = ["sqrt_linear (AnimateDiff)", "linear (SD1.5 default)", "keep the model's"]
_SCHEDULE_NAMES = {BETA_SCHEDULES[0]: "linear", BETA_SCHEDULES[1]: "scaled_linear"}


class MotionModule:
    """The MOTION_MODULE value: a loaded motion-module file plus the MotionLoRAs chained onto it."""

    def __init__(self, file, loras=()):
        self.file = file
        self.loras = tuple(loras)

    def with_lora(self, lora, strength):
        return MotionModule(self.file, self.loras + ((lora, strength),))

    def __repr__(self):
        return f"MotionModule({self.file!r}, loras={[(l.name, s) for l, s in self.loras]})"


def _error(node, message):
    return ValueError(f"{node}: {message}")


class CVGLoadMotionModule:
    DESCRIPTION = (
        "Load an AnimateDiff SD1.5 motion module (v1, v2, v3 or AnimateLCM-style) from "
        "models/animatediff_models. The version is detected from the file."
    )
    RETURN_TYPES = ("MOTION_MODULE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (comfy_bridge.model_files("animatediff_models"),)}}

    def load(self, model_name):
        path = comfy_bridge.model_path("animatediff_models", model_name)
        try:
            f = loading.load_motion_module(path)
        except CheckpointError as e:
            raise _error("CVG Load Motion Module", str(e)) from e
        print(f"[CVG] motion module {model_name}: AnimateDiff {f.version}, PE length {f.pe_length}, "
              f"mid block {'yes' if f.has_mid else 'no'}")
        return (MotionModule(f),)


class CVGLoadMotionLoRA:
    DESCRIPTION = (
        "Add a MotionLoRA (models/animatediff_motion_lora) with its own strength to a motion module. Chain "
        "several. The LoRA is merged into a copy when the module is applied; the loaded module is unchanged."
    )
    RETURN_TYPES = ("MOTION_MODULE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_module": ("MOTION_MODULE",),
                "lora_name": (comfy_bridge.model_files("animatediff_motion_lora"),),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def load(self, motion_module, lora_name, strength):
        path = comfy_bridge.model_path("animatediff_motion_lora", lora_name)
        try:
            lora = motion_lora.load_motion_lora(path)
            motion_lora.check_fits(motion_module.file.modules, lora)
        except CheckpointError as e:
            raise _error("CVG Load MotionLoRA", str(e)) from e
        return (motion_module.with_lora(lora, strength),)


def _diffusion_model(model, node):
    inner = getattr(model, "model", None)
    unet = getattr(inner, "diffusion_model", None)
    config = getattr(inner, "model_config", None)
    kind = type(config).__name__ if config is not None else type(inner).__name__
    unet_config = getattr(config, "unet_config", None) or {}
    context_dim = unet_config.get("context_dim")
    if unet is None or (context_dim is not None and context_dim != 768):
        raise _error(
            node,
            f"AnimateDiff SD1.5 motion modules need an SD1.5 MODEL, but this MODEL is {kind}"
            + (f" (text context {context_dim}, SD1.5 has 768)" if context_dim else "")
            + "; load an SD1.5 checkpoint with Load Checkpoint",
        )
    return unet, kind


def _compute_dtype(model):
    dtype = model.object_patches.get("manual_cast_dtype") if hasattr(model, "object_patches") else None
    dtype = dtype or getattr(model.model, "manual_cast_dtype", None)
    if dtype is None:
        dtype = model.model.get_dtype() if hasattr(model.model, "get_dtype") else None
    return dtype


def _model_object(model, name):
    if hasattr(model, "get_model_object"):
        return model.get_model_object(name)
    if name in getattr(model, "object_patches", {}):
        return model.object_patches[name]
    return getattr(model.model, name)


def _is_animated(model):
    for value in getattr(model, "object_patches", {}).values():
        children = getattr(value, "children", None)
        if callable(children) and any(isinstance(c, mm.MotionLayer) for c in children()):
            return True
    return False


class CVGApplyMotionModule:
    DESCRIPTION = (
        "Animate a native SD1.5 MODEL: inserts the motion module after the right UNet blocks (a clone; the "
        "input MODEL is unchanged). The latent batch is the frames. Clips longer than context_length run in "
        "sliding windows of context_length frames overlapping by context_overlap (context_length 0 = all "
        "frames at once, at most the module's positional-encoding length). motion_scale multiplies the motion "
        "modules' contribution. beta_schedule: the schedule the modules were trained with (diffusers 'linear' "
        "0.00085–0.012 = ComfyUI 'sqrt_linear') by default."
    )
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "motion_module": ("MOTION_MODULE",),
                "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "beta_schedule": (BETA_SCHEDULES, {"default": BETA_SCHEDULES[0]}),
                "context_length": ("INT", {"default": 16, "min": 0, "max": 128, "step": 1}),
                "context_overlap": ("INT", {"default": 4, "min": 0, "max": 127, "step": 1}),
                "closed_loop": ("BOOLEAN", {"default": False}),
                "fuse_method": (list(context.FUSE_METHODS), {"default": "pyramid"}),
            }
        }

    def apply(self, model, motion_module, motion_scale, beta_schedule, context_length, context_overlap,
              closed_loop, fuse_method):
        node = "CVG Apply Motion Module"
        f = motion_module.file
        if context_length > f.pe_length:
            raise _error(node, f"context_length {context_length} exceeds the positional-encoding length "
                               f"{f.pe_length} of {f.name} ({f.version}); use at most {f.pe_length}")
        if context_length and context_overlap >= context_length:
            raise _error(node, f"context_overlap {context_overlap} must be smaller than context_length {context_length}")
        unet, kind = _diffusion_model(model, node)
        if _is_animated(model):
            raise _error(node, "this MODEL already has a motion module applied; apply one motion module per MODEL")
        try:
            mm.check_layout(unet, f.modules)
        except ValueError as e:
            raise _error(node, f"{e} (this MODEL is {kind})") from e

        try:
            overrides = motion_lora.merged_weights(f.modules, list(motion_module.loras))
        except CheckpointError as e:
            raise _error(node, str(e)) from e
        instance = motion_lora.build_instance(f.modules, overrides, dtype=_compute_dtype(model))
        state = mm.FrameState()
        patches = mm.block_patches(unet, instance, state, motion_scale)

        m = model.clone()
        for path, block in patches.items():
            m.add_object_patch(f"diffusion_model.{path}", block)
        if hasattr(m, "size") and isinstance(m.size, int) and m.size > 0:
            m.size += sum(t.numel() * t.element_size() for t in instance.state_dict().values())

        previous = m.model_options.get("model_function_wrapper")
        pe_length = f.pe_length
        options = dict(context_length=context_length, overlap=context_overlap, closed_loop=closed_loop,
                       method=fuse_method, pe_length=pe_length, check=comfy_bridge.check_interrupt)

        # A plain function (not a callable object): ModelPatcher.clone deep-copies model_options, and a
        # function is copied by reference, so the motion modules are never duplicated.
        def animatediff_wrapper(apply_model, args):
            cond_or_uncond = args["cond_or_uncond"]

            def call(x, t, c):
                if previous is not None:
                    return previous(apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond})
                return apply_model(x, t, **c)

            return context.run(call, args["input"], args["timestep"], args["c"], len(cond_or_uncond), state, **options)

        m.set_model_unet_function_wrapper(animatediff_wrapper)

        if beta_schedule in _SCHEDULE_NAMES:
            sampling = copy.deepcopy(_model_object(m, "model_sampling"))
            if not hasattr(sampling, "_register_schedule"):
                raise _error(node, f"this MODEL's sampling ({type(sampling).__name__}) is not a discrete β "
                                   "schedule; choose beta_schedule \"keep the model's\"")
            sampling._register_schedule(given_betas=mm.training_betas(_SCHEDULE_NAMES[beta_schedule]),
                                        timesteps=1000, linear_start=0.00085, linear_end=0.012)
            m.add_object_patch("model_sampling", sampling)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "CVGLoadMotionModule": CVGLoadMotionModule,
    "CVGLoadMotionLoRA": CVGLoadMotionLoRA,
    "CVGApplyMotionModule": CVGApplyMotionModule,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CVGLoadMotionModule": "CVG Load Motion Module",
    "CVGLoadMotionLoRA": "CVG Load MotionLoRA",
    "CVGApplyMotionModule": "CVG Apply Motion Module",
}
