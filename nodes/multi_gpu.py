"""CVG Multi-GPU: settings that make CVG Sampler run the Wan forwards on several devices.

Thin adapter: the worker processes, sequence parallel and CFG parallel are models/wan/multi_device.py.
"""
from ..models.wan import multi_device
from . import comfy_bridge


class CVGMultiGPU:
    DESCRIPTION = (
        "Runs CVG Sampler's Wan forwards on several GPUs: one worker process per GPU, started on the first run and "
        "kept (with the model loaded) for the next ones. cfg_parallel puts the conditional and unconditional passes "
        "on two halves of the GPUs; within a half (or over all GPUs without cfg_parallel) the video tokens are split "
        "across the GPUs (Ulysses sequence parallel), which needs the model's head count (1.3B: 12, 14B: 40) to be "
        "divisible by the GPUs per half. device 'cpu' runs the workers as CPU processes (gloo), for testing. Same "
        "result as one GPU up to float rounding; frame guidance and the step cache are not available here."
    )
    CATEGORY = "CVG/wan"
    FUNCTION = "settings"
    RETURN_TYPES = ("CVG_MULTI_GPU",)
    RETURN_NAMES = ("multi_gpu",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "device": (list(multi_device.DEVICE_TYPES), {"default": "cuda"}),
                "devices": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip":
                    "worker processes, one per GPU (the first N visible ones: set CUDA_VISIBLE_DEVICES to choose)"}),
                "cfg_parallel": ("BOOLEAN", {"default": True, "tooltip":
                    "conditional and unconditional passes at the same time on two halves of the devices (needs an "
                    "even count); off: every device works on both passes, one after the other"}),
            },
            "optional": {
                "keep_workers": ("BOOLEAN", {"default": True, "tooltip":
                    "keep the workers and their copy of the model between runs (off: stop them after each sample, "
                    "which frees the GPUs but reloads the model next time)"}),
            },
        }

    def settings(self, device, devices, cfg_parallel, keep_workers=True):
        try:
            multi_device.check_devices(device, int(devices))
            multi_device.check_halves(int(devices), bool(cfg_parallel))
        except ValueError as e:
            raise ValueError(f"CVG Multi-GPU: {e}") from e
        return ({"device": device, "devices": int(devices), "cfg_parallel": bool(cfg_parallel),
                 "keep_workers": bool(keep_workers)},)


def _check(settings):
    if not isinstance(settings, dict) or not {"device", "devices", "cfg_parallel"} <= set(settings):
        raise TypeError("CVG Sampler: multi_gpu must come from a 'CVG Multi-GPU' node")


def prepare(patcher, settings, frame_guidance=0.0, step_cache_threshold=0.0, batch_cfg=False):
    """The sampler's own model for a multi-device run, after the checks: left on the offload device, since the
    workers hold their own copies."""
    _check(settings)
    if frame_guidance:
        raise ValueError("CVG Sampler: frame_guidance is not available with CVG Multi-GPU yet; set it to 0 or "
                         "disconnect multi_gpu")
    if step_cache_threshold:
        raise ValueError("CVG Sampler: the step cache is not available with CVG Multi-GPU yet (each device would "
                         "decide on its own part of the video); set step_cache_threshold to 0 or disconnect multi_gpu")
    dit = patcher.model
    try:
        multi_device.check_layout(dit.config.heads, settings["devices"], settings["cfg_parallel"], bool(batch_cfg))
    except ValueError as e:
        raise ValueError(f"CVG Sampler with CVG Multi-GPU: {e}") from e
    if settings["device"] == "cuda":
        comfy_bridge.free_gpu_memory()  # worker 0 shares the first GPU with ComfyUI's own models
    return dit


def sample(dit, settings, context, negative_context, latent_raw, seed, callback=None, **kwargs):
    """multi_device.sample_video on the process-wide pool for these settings; interrupts checked while waiting."""
    pool = multi_device.shared_pool(settings["device"], settings["devices"])
    try:
        return multi_device.sample_video(pool, dit, context, negative_context, latent_raw, seed,
                                         cfg_parallel=settings["cfg_parallel"], callback=callback,
                                         should_stop=comfy_bridge.check_interrupt, **kwargs)
    finally:
        if not settings.get("keep_workers", True):
            multi_device.close_shared_pool()


NODE_CLASS_MAPPINGS = {"CVGMultiGPU": CVGMultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"CVGMultiGPU": "CVG Multi-GPU"}
