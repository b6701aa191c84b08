"""Video files as nodes: CVG Save Video, CVG Decode To Video, CVG Load Video.

Thin adapters over models/video_files.py. Files are named like ComfyUI's own savers
(<prefix>_<counter:05>_.<ext> in the output folder, optional sub-folders in the prefix) and never leave
the output folder. The UI result carries the saved file under "cvg_video" (read by js/cvg.js, which plays
it inside the node in both the old and the current frontend) and, for formats an <img> can show (gif,
webp, the first frame of a png sequence), also under "images" so the native preview shows it too.
"""
import hashlib
import os
import re

from ..models import video_files
from . import comfy_bridge

FORMAT_NAMES = list(video_files.FORMATS)
PRESETS = list(video_files.X264_PRESETS)
RESIZE_MODES = ["none", "crop to multiple of 16", "pad to multiple of 16"]
_DRIVE = re.compile(r"^[a-zA-Z]:")


def check_prefix(prefix):
    """Reject filename prefixes that could write outside the output folder; returns the cleaned prefix."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError("filename_prefix is empty; give a name such as 'CVG/video'")
    prefix = prefix.strip()
    problems = []
    if "\x00" in prefix:
        problems.append("it contains a NUL character")
    if prefix.startswith(("/", "\\", "~")) or _DRIVE.match(prefix) or os.path.isabs(prefix):
        problems.append("it is an absolute path")
    if any(part == ".." for part in re.split(r"[\\/]+", prefix)):
        problems.append("it contains '..'")
    if problems:
        raise ValueError(
            f"filename_prefix {prefix!r} is not allowed: {' and '.join(problems)}. Use a name relative to "
            f"ComfyUI's output folder, optionally with sub-folders, e.g. 'CVG/my_clip'.")
    return prefix


def _metadata(prompt, extra_pnginfo):
    if comfy_bridge.metadata_disabled():
        return None
    meta = {}
    if prompt is not None:
        meta["prompt"] = prompt
    for key, value in (extra_pnginfo or {}).items():
        meta[key] = value
    return meta


def _audio(audio):
    if audio is None:
        return None
    try:
        return audio["waveform"], int(audio["sample_rate"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"audio input must be ComfyUI AUDIO {{'waveform': [B,C,S], 'sample_rate': int}}; got "
                         f"{type(audio).__name__}") from e


def save_frames(chunks, width, height, filename_prefix, format, fps, crf, preset, audio, prompt,
                extra_pnginfo, total=None):
    """Encode an iterable of IMAGE chunks to a new file in the output folder; returns the UI entry."""
    prefix = check_prefix(filename_prefix)
    if format not in video_files.FORMATS:
        raise ValueError(f"format {format!r} is unknown; expected one of {', '.join(FORMAT_NAMES)}")
    folder, filename, counter, subfolder, _ = comfy_bridge.save_path(prefix, width, height)
    output = os.path.realpath(comfy_bridge.output_directory())
    if os.path.commonpath((output, os.path.realpath(folder))) != output:
        raise ValueError(f"filename_prefix {filename_prefix!r} resolves outside the output folder")
    ext = video_files.FORMATS[format]["ext"]
    name = f"{filename}_{counter:05}_{ext}"
    path = os.path.join(folder, name)
    progress = comfy_bridge.Progress(total) if total else None
    writer = video_files.VideoWriter(path, format=format, fps=fps, crf=crf, preset=preset,
                                     metadata=_metadata(prompt, extra_pnginfo), audio=_audio(audio))
    with writer:
        for chunk in chunks:
            comfy_bridge.check_interrupt()
            writer.write(chunk)
            if progress is not None:
                progress.update(int(chunk.shape[0]))
    entry = {"filename": name, "subfolder": subfolder, "type": "output", "format": format,
             "mime": video_files.FORMATS[format]["mime"], "frames": writer.frames_written, "fps": float(fps),
             "playable": bool(video_files.FORMATS[format]["browser"])}
    return entry


def ui_result(entry):
    ui = {"cvg_video": [entry]}
    fmt = entry["format"]
    if fmt in ("gif", "webp"):
        ui["images"] = [{"filename": entry["filename"], "subfolder": entry["subfolder"], "type": "output"}]
        ui["animated"] = [True]
    elif fmt == "png-sequence":
        sub = "/".join(p for p in (entry["subfolder"], entry["filename"]) if p)
        ui["images"] = [{"filename": "frame_000001.png", "subfolder": sub, "type": "output"}]
    return ui


def _common_inputs():
    return {
        "filename_prefix": ("STRING", {"default": "CVG/video", "tooltip": "Name (and optional sub-folders) "
                                       "inside ComfyUI's output folder; a counter is appended."}),
        "format": (FORMAT_NAMES, {"default": "mp4", "tooltip": "mp4 = H.264 yuv420p; webm = VP9; webp/gif "
                                  "= animated images; mkv-ffv1 / png-sequence = lossless."}),
        "fps": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 240.0, "step": 0.01}),
        "crf": ("INT", {"default": 19, "min": 0, "max": 63, "tooltip": "Quality: lower is better and larger. "
                        "H.264 0-51, VP9 0-63; webp quality = 100 - crf. Ignored by the lossless formats."}),
        "preset": (PRESETS, {"default": "medium", "tooltip": "Encoder speed (H.264 preset; VP9 cpu-used)."}),
    }


class CVGSaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE",), **_common_inputs()},
            "optional": {"audio": ("AUDIO",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "CVG/video"
    DESCRIPTION = ("Encodes an IMAGE batch to a video file in the output folder (mp4/webm/webp/gif, or lossless "
                   "mkv-ffv1 / png sequence), embedding the prompt and workflow, and previews it in the node.")

    def save(self, images, filename_prefix, format, fps, crf, preset, audio=None, prompt=None,
             extra_pnginfo=None):
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be an IMAGE batch [frames, H, W, C] with at least one frame; got "
                             f"shape {tuple(images.shape)}")
        step = 16

        def chunks():
            for i in range(0, images.shape[0], step):
                yield images[i:i + step]

        entry = save_frames(chunks(), images.shape[2], images.shape[1], filename_prefix, format, fps, crf,
                            preset, audio, prompt, extra_pnginfo, total=images.shape[0])
        return {"ui": ui_result(entry)}


class CVGDecodeToVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"samples": ("LATENT",), "vae": ("CVG_VAE",), **_common_inputs()},
            "optional": {"audio": ("AUDIO",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "decode"
    OUTPUT_NODE = True
    CATEGORY = "CVG/video"
    DESCRIPTION = ("Decodes a Wan latent chunk by chunk and encodes the frames as they come, so memory stays "
                   "flat in the clip length. The node long-video workflows end with.")

    def decode(self, samples, vae, filename_prefix, format, fps, crf, preset, audio=None, prompt=None,
               extra_pnginfo=None):
        z = samples["samples"] if isinstance(samples, dict) else samples
        if z.ndim != 5 or z.shape[1] != getattr(vae, "latent_channels", 16):
            raise ValueError(f"samples must be a Wan video LATENT [B, {getattr(vae, 'latent_channels', 16)}, T, "
                             f"H, W]; got shape {tuple(z.shape)}. Connect a CVG/Wan latent, not an image "
                             f"latent.")
        h, w = z.shape[3] * 8, z.shape[4] * 8
        ui = {}
        for b in range(z.shape[0]):
            # iter_decode_images drives the progress bar (one step per latent frame) and checks interrupts
            entry = save_frames(vae.iter_decode_images(z[b:b + 1]), w, h, filename_prefix, format, fps, crf,
                                preset, audio, prompt, extra_pnginfo, total=None)
            for key, value in ui_result(entry).items():
                ui.setdefault(key, []).extend(value)
        return {"ui": ui}


def _input_videos():
    root = comfy_bridge.input_directory()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.lower().endswith(video_files.READABLE_EXTENSIONS) and not f.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def _input_path(name):
    """Path of a file in the input folder; 'name [output]' (ComfyUI's annotation) reads the output folder."""
    if not isinstance(name, str) or not name:
        raise ValueError("no video selected; upload one or put it in ComfyUI's input folder")
    root, where = comfy_bridge.input_directory(), "input"
    if name.endswith(" [input]"):
        name = name[:-len(" [input]")]
    elif name.endswith(" [output]"):
        name, root, where = name[:-len(" [output]")], comfy_bridge.output_directory(), "output"
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath((root, path)) != root:
        raise ValueError(f"video {name!r} is outside ComfyUI's {where} folder")
    if not os.path.exists(path):
        raise ValueError(f"video {name!r} was not found in ComfyUI's {where} folder ({root}); upload it again")
    return path


class CVGLoadVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frame_cap": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "0 = all frames"}),
                "skip_first": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000}),
                "force_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.01,
                                        "tooltip": "0 = keep the file's rate; otherwise frames are dropped "
                                        "or repeated to this rate"}),
                "resize": (RESIZE_MODES, {"default": "none"}),
                "max_side": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                     "tooltip": "0 = keep; otherwise scale down (in the decoder) so the "
                                     "longer side is at most this"}),
                "snap_4k1": ("BOOLEAN", {"default": False, "tooltip": "Drop the last 1-3 frames so the count "
                                         "is 4k+1, as the Wan VAE needs"}),
                # Last on purpose: both frontends append the upload button after the node's required widgets
                # (the current one builds it from video_upload; on the old one js/cvg.js adds it), so
                # widgets_values stay [..., video, upload] everywhere.
                "video": (_input_videos(), {"video_upload": True,
                                            "tooltip": "A video or animation in ComfyUI's input folder; "
                                            "use the upload button to add one."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("images", "fps", "frame_count")
    FUNCTION = "load"
    CATEGORY = "CVG/video"
    DESCRIPTION = ("Loads a video from the input folder as an IMAGE batch, streaming frames from the decoder "
                   "(selection, downscaling and cropping happen per frame).")

    def load(self, video, frame_cap, skip_first, every_nth, force_fps, resize, max_side, snap_4k1):
        path = _input_path(video)
        multiple, fit = {"none": (0, "crop"), "crop to multiple of 16": (16, "crop"),
                         "pad to multiple of 16": (16, "pad")}[resize]
        try:
            reader = video_files.VideoReader(path, frame_cap=frame_cap, skip_first=skip_first,
                                             every_nth=every_nth, force_fps=force_fps, multiple=multiple,
                                             fit=fit, snap_4k1=snap_4k1, max_side=max_side)
            images = reader.read()
        except video_files.VideoFileError as e:
            raise ValueError(f"CVG Load Video: {e}") from e
        return (images, float(reader.fps), int(images.shape[0]))

    @classmethod
    def IS_CHANGED(cls, video, **kwargs):
        try:
            path = _input_path(video)
        except ValueError:
            return ""
        st = os.stat(path)
        return hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, video, **kwargs):
        try:
            _input_path(video)
        except ValueError as e:
            return str(e)
        return True


NODE_CLASS_MAPPINGS = {
    "CVGSaveVideo": CVGSaveVideo,
    "CVGDecodeToVideo": CVGDecodeToVideo,
    "CVGLoadVideo": CVGLoadVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CVGSaveVideo": "CVG Save Video",
    "CVGDecodeToVideo": "CVG Decode To Video",
    "CVGLoadVideo": "CVG Load Video",
}
