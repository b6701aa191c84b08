"""The one place that talks to ComfyUI's services.

Everything here exists both in the oldest ComfyUI the pack supports (the March 2024 tree the test host
runs) and in current ComfyUI, or is feature-detected before use. Stage modules call these helpers
instead of reaching into `comfy` themselves, so an API change is mended in one file.
"""
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

WEIGHT_EXTENSIONS = {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}

# Folder key -> default sub-folder of ComfyUI's models dir. Native keys first, then the keys the
# AnimateDiff ecosystem already uses, so users' existing model folders are found.
MODEL_FOLDERS = {
    "diffusion_models": "diffusion_models",
    "vae": "vae",
    "loras": "loras",
    "clip_vision": "clip_vision",
    "text_encoders": "text_encoders",
    "animatediff_models": "animatediff_models",
    "animatediff_motion_lora": "animatediff_motion_lora",
}


def register_model_folders():
    """Make every folder key the pack reads exist, with explicit extensions, without dropping paths
    that ComfyUI or extra_model_paths.yaml already registered for that key."""
    for key, sub in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, sub)
        paths, extensions = folder_paths.folder_names_and_paths.get(key, ([], set()))
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        if key == "diffusion_models" and "unet" in folder_paths.folder_names_and_paths:
            # Older ComfyUI keeps diffusion models under "unet"; read both.
            for p in folder_paths.folder_names_and_paths["unet"][0]:
                if p not in paths:
                    paths.append(p)
        folder_paths.folder_names_and_paths[key] = (paths, set(extensions) | WEIGHT_EXTENSIONS)


# Files the pack ships (the demo weights), listed under one folder key each without adding their folder
# to ComfyUI's registry, so no loader lists files of another kind and native loaders are untouched.
_BUNDLED = {}


def add_bundled_file(key, path):
    _BUNDLED.setdefault(key, {})[os.path.basename(path)] = path


def model_files(key):
    user = list(folder_paths.get_filename_list(key))
    return user + sorted(n for n in _BUNDLED.get(key, {}) if n not in user)


def model_path(key, name):
    path = folder_paths.get_full_path(key, name) or _BUNDLED.get(key, {}).get(name)
    if path is None:
        raise FileNotFoundError(
            f"model file {name!r} was not found in the {key!r} folders "
            f"({', '.join(folder_paths.get_folder_paths(key))}); put it there or pick another file"
        )
    return path


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(name, device):
    """A dtype widget value ("auto", "bf16", "fp16", "fp32") for a device: auto is bf16 (fp16 where bf16 is
    missing) on CUDA, fp16 on MPS and fp32 on the CPU."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def torch_device():
    return mm.get_torch_device()


def offload_device():
    return mm.unet_offload_device()


def intermediate_device():
    return mm.intermediate_device()


def wrap_model(module, load_device=None, offload=None):
    """A ModelPatcher around a plain nn.Module so ComfyUI loads and offloads it with its other models."""
    load_device = load_device or torch_device()
    offload = offload or offload_device()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload, size=size)


def load_to_device(patcher):
    """Ask ComfyUI's memory manager to put the patched model on its load device."""
    mm.load_models_gpu([patcher])
    return patcher.model


def load_to_device_with_memory(patcher, memory_required=0):
    """load_to_device that also asks ComfyUI to free `memory_required` bytes for activations."""
    mm.load_models_gpu([patcher], memory_required=int(memory_required))
    return patcher.model


def free_gpu_memory():
    """Unload ComfyUI's models from its GPU and release the cache (before worker processes take the GPUs)."""
    mm.unload_all_models()
    mm.soft_empty_cache()


def check_interrupt():
    mm.throw_exception_if_processing_interrupted()


def is_oom(error):
    return isinstance(error, mm.OOM_EXCEPTION)


def soft_empty_cache():
    mm.soft_empty_cache()


class Progress:
    """ComfyUI's progress bar plus an interrupt check on every update (old ProgressBars do not check)."""

    def __init__(self, total):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, n=1, preview=None):
        check_interrupt()
        if preview is None:
            self.bar.update(n)
        else:
            self.bar.update_absolute(self.bar.current + n, preview=preview)
        check_interrupt()


def output_directory():
    return folder_paths.get_output_directory()


def input_directory():
    return folder_paths.get_input_directory()


def temp_directory():
    return folder_paths.get_temp_directory()


def save_path(prefix, width=0, height=0):
    """(full_folder, filename, counter, subfolder, prefix) exactly as ComfyUI's own savers name files."""
    return folder_paths.get_save_image_path(prefix, output_directory(), width, height)


def no_grad():
    return torch.inference_mode()


def metadata_disabled():
    """True when ComfyUI was started with --disable-metadata (savers then embed no prompt/workflow)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def preview_method():
    """The server's latent preview method ('none', 'auto', 'latent2rgb', 'taesd'); 'none' when unknown."""
    try:
        from comfy.cli_args import args

        method = args.preview_method
    except Exception:
        return "none"
    return str(getattr(method, "value", method))


def model_files_ending(key, suffix):
    """Relative paths of the files ending with `suffix` in a folder key's folders, whatever extensions the
    key registers (e.g. diffusers `*.safetensors.index.json` of sharded models)."""
    found = set()
    for base in folder_paths.get_folder_paths(key):
        if not os.path.isdir(base):
            continue
        for root, _, files in os.walk(base, followlinks=True):
            for f in files:
                if f.endswith(suffix):
                    found.add(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(found)
