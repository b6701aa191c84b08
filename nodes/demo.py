"""Demo-world nodes: the caption encoder of the bundled demo models and a ground-truth scene renderer.

The bundled weights (models/demo/weights/*.safetensors) are listed when the pack loads, each under its own
folder key: `CVG Load VAE` lists cvg_demo_vae.safetensors and `CVG Load Wan Model` lists
cvg_demo_t2v.safetensors / cvg_demo_i2v.safetensors without any user action (a user's file of the same
name in ComfyUI's folders takes precedence).
"""
import os

import torch

from . import comfy_bridge
from ..models import checkpoints
from ..models.demo import captions, world

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo", "weights")
TEXT_ENCODER_FILE = "cvg_demo_text_encoder.safetensors"
DEFAULT_CAPTION = "a red circle moving right quickly on a black background"


BUNDLED = {"vae": ("cvg_demo_vae.safetensors",),
           "diffusion_models": ("cvg_demo_t2v.safetensors", "cvg_demo_i2v.safetensors")}


def register_bundled_weights():
    """List each bundled file under its own folder key (CVG Load VAE / CVG Load Wan Model)."""
    for key, names in BUNDLED.items():
        for name in names:
            path = os.path.join(WEIGHTS_DIR, name)
            if os.path.isfile(path):
                comfy_bridge.add_bundled_file(key, path)


register_bundled_weights()

_ENCODER = {}


def load_text_encoder(path=None):
    """The bundled caption encoder (cached per file), CPU, eval mode."""
    path = path or os.path.join(WEIGHTS_DIR, TEXT_ENCODER_FILE)
    key = (path, os.path.getmtime(path) if os.path.exists(path) else None)
    if key not in _ENCODER:
        if key[1] is None:
            raise FileNotFoundError(
                f"the demo caption encoder {path!r} is missing; reinstall the pack (it ships in "
                "models/demo/weights) or run `python -m models.demo.train --out models/demo/weights`")
        state = checkpoints.read_state_dict(path)
        enc = captions.CaptionEncoder()
        problem = checkpoints.describe_mismatch(
            {k: tuple(v.shape) for k, v in enc.state_dict().items()},
            {k: tuple(v.shape) for k, v in state.items()}, "demo caption encoder")
        if problem:
            raise checkpoints.CheckpointError(f"{os.path.basename(path)!r} is {problem}")
        enc.load_state_dict({k: v.float() for k, v in state.items()})
        _ENCODER.clear()
        _ENCODER[key] = enc.eval().requires_grad_(False)
    return _ENCODER[key]


class CVGDemoTextEncode:
    DESCRIPTION = (
        "Encodes a caption of the demo world for the bundled demo models (cvg_demo_t2v / cvg_demo_i2v): "
        "CONDITIONING of width 64. Captions follow the grammar: " + captions.GRAMMAR_HELP + ". "
        "Use an empty caption as the negative prompt."
    )
    CATEGORY = "CVG/demo"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": DEFAULT_CAPTION})}}

    def encode(self, text):
        captions.parse(text)  # clear error for captions outside the grammar
        with torch.no_grad():
            emb = load_text_encoder().encode(text).to(torch.float32)
        return ([[emb, {}]],)


class CVGDemoScene:
    DESCRIPTION = (
        "Renders a ground-truth clip of the demo world (one coloured shape on a plain background, animated "
        "as the caption says; deterministic from the seed) as IMAGE frames 0..1, e.g. the start image of "
        "the demo I2V workflow. length must be 4k+1; clips longer than 17 frames bounce off the walls. A "
        "length below 17 gives the first frames of the seed's 17-frame clip, so a start image leaves room "
        "for 17 frames of the caption's motion (it does not start against the wall it moves towards)."
    )
    CATEGORY = "CVG/demo"
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "default": DEFAULT_CAPTION}),
                "length": ("INT", {"default": 17, "min": 1, "max": 1025, "step": 4}),
                "size": ("INT", {"default": 64, "min": 16, "max": 512, "step": 16}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            }
        }

    def render(self, text, length, size, seed):
        cap = captions.parse(text)
        if cap is None:
            raise ValueError("CVG Demo Scene needs a caption; got an empty one. Expected " + captions.GRAMMAR_HELP)
        return (world.scene(cap, int(length), int(size), int(seed)),)


NODE_CLASS_MAPPINGS = {"CVGDemoTextEncode": CVGDemoTextEncode, "CVGDemoScene": CVGDemoScene}
NODE_DISPLAY_NAME_MAPPINGS = {"CVGDemoTextEncode": "CVG Demo Text Encode", "CVGDemoScene": "CVG Demo Scene"}
