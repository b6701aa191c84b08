"""Video files with PyAV: streaming writers and readers for IMAGE-like frames, plus workflow metadata.

No ComfyUI import here; `nodes/video_io.py` adapts this to nodes. Frames are float arrays [n,H,W,3] in
0..1 (torch tensors or numpy arrays); they are quantised to 8 bit by rounding.

Formats (`FORMATS`):
  mp4           H.264 (libx264) yuv420p, CRF + preset, AAC audio. Metadata: mp4 `udta/meta` keys written
                with movflags=use_metadata_tags (key "prompt", "workflow", ...: what current ComfyUI writes
                and its frontend reads when a file is dropped on the canvas).
  webm          VP9 (libvpx-vp9) yuv420p constant quality (CRF, b=0), Opus audio. Metadata: Matroska
                tags (ffmpeg upper-cases the names: PROMPT, WORKFLOW).
  mkv-ffv1      FFV1 in Matroska, RGB (bgr0): lossless, bit-exact 8-bit RGB. FLAC audio.
                Metadata: Matroska tags as webm. Browsers cannot play it (no preview).
  webp          animated WebP (libwebp_anim), lossy quality = 100 - crf. Metadata: an EXIF chunk like
                ComfyUI's SaveAnimatedWEBP (0x0110 "prompt:<json>", 0x010f "workflow:<json>", further
                keys at 0x010e, 0x010d, ...). Frame durations are whole milliseconds, so fps is
                approximate (24 fps reads back as 1000/42). Read back with Pillow (ffmpeg cannot decode
                animated WebP).
  gif           GIF with one adaptive 256-colour palette per frame (palettegen/paletteuse, dithered).
                Durations are centiseconds (fps quantised to 100/n). Metadata: a GIF comment extension
                "CVG-METADATA:<json of all keys>" appended before the trailer.
  png-sequence  a folder of 8-bit RGB PNGs frame_000001.png... (lossless). Metadata: PNG tEXt chunks
                on the first frame ("prompt", "workflow", like ComfyUI's SaveImage, so that frame
                restores the workflow when dropped on the canvas) plus "cvg_fps".

Writers write to a hidden temporary name in the destination folder and rename it at the end; on any
error the temporary file is deleted, so a failed encode leaves nothing behind.
"""
import fractions
import json
import math
import os
import shutil
import struct
import uuid

import av
import av.filter
import numpy as np
import torch

FORMATS = {
    "mp4": {"ext": ".mp4", "container": "mp4", "codec": "libx264", "pix_fmt": "yuv420p", "audio": "aac",
            "lossless": False, "browser": True, "mime": "video/mp4"},
    "webm": {"ext": ".webm", "container": "webm", "codec": "libvpx-vp9", "pix_fmt": "yuv420p",
             "audio": "libopus", "lossless": False, "browser": True, "mime": "video/webm"},
    "webp": {"ext": ".webp", "container": "webp", "codec": "libwebp_anim", "pix_fmt": "yuv420p",
             "audio": None, "lossless": False, "browser": True, "mime": "image/webp"},
    "gif": {"ext": ".gif", "container": "gif", "codec": "gif", "pix_fmt": "pal8", "audio": None,
            "lossless": False, "browser": True, "mime": "image/gif"},
    "mkv-ffv1": {"ext": ".mkv", "container": "matroska", "codec": "ffv1", "pix_fmt": "bgr0",
                 "audio": "flac", "lossless": True, "browser": False, "mime": "video/x-matroska"},
    "png-sequence": {"ext": "", "container": None, "codec": "png", "pix_fmt": "rgb24", "audio": None,
                     "lossless": True, "browser": False, "mime": None},
}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow")
# libvpx-vp9 speed (cpu-used) for the same preset names: faster presets -> higher speed.
_VP9_SPEED = {"ultrafast": 8, "superfast": 7, "veryfast": 6, "faster": 5, "fast": 4, "medium": 3,
              "slow": 2, "slower": 1, "veryslow": 0}
READABLE_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi", ".gif", ".webp", ".ogv", ".flv",
                       ".ts", ".mpg", ".mpeg", ".wmv")
GIF_COMMENT_TAG = b"CVG-METADATA:"
_PNG_FRAME = "frame_{:06d}.png"


class VideoFileError(ValueError):
    """A video file could not be written or read; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------- helpers

def to_uint8(frames):
    """float [n,H,W,C] / [H,W,C] in 0..1 (torch or numpy) or uint8 -> contiguous uint8 numpy [n,H,W,3]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach()
        if frames.dtype == torch.uint8:
            arr = frames.cpu().numpy()
        else:
            arr = frames.float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    else:
        arr = np.asarray(frames)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise VideoFileError(
            f"frames must be an IMAGE batch [frames, height, width, 3]; got shape {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        raise VideoFileError("frames have 4 channels (RGBA); video formats here store RGB only. "
                             "Drop the alpha channel (or composite it) before saving.")
    return np.ascontiguousarray(arr)


def psnr(a, b):
    """PSNR in dB between two uint8 or 0..1 float arrays of equal shape."""
    a = to_uint8(a).astype(np.float64)
    b = to_uint8(b).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _fps_fraction(fps):
    if not (isinstance(fps, (int, float, fractions.Fraction)) and fps > 0 and math.isfinite(fps)):
        raise VideoFileError(f"fps must be a positive number; got {fps!r}")
    return fractions.Fraction(fps).limit_denominator(1001 * 1000)


def temp_path_for(path):
    """Hidden temporary sibling of `path` (same folder, so the final rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial")


def _remove(path):
    try:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    except OSError:
        pass


def _metadata_strings(metadata):
    out = {}
    for key, value in (metadata or {}).items():
        if value is None:
            continue
        out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return out


# ----------------------------------------------------------------------------------------------- writer

class VideoWriter:
    """Streaming encoder: `write(chunk)` any number of times, then `close()` (or use as a context manager;
    an exception inside the `with` block deletes the partial file). Memory stays flat: each chunk is
    quantised, encoded and muxed before the call returns.

    audio: None or (waveform [channels, samples] float -1..1, sample_rate); trimmed to the video length.
    """

    def __init__(self, path, format="mp4", fps=24.0, crf=19, preset="medium", metadata=None, audio=None,
                 loop=0):
        if format not in FORMATS:
            raise VideoFileError(f"unknown video format {format!r}; expected one of {', '.join(FORMATS)}")
        self.spec = FORMATS[format]
        self.format = format
        self.path = os.path.abspath(path)
        self.fps = float(fps)
        self.rate = _fps_fraction(fps)
        self.crf = int(crf)
        self.preset = preset
        self.loop = int(loop)
        self.metadata = _metadata_strings(metadata)
        self.frames_written = 0
        self.width = self.height = None
        self.closed = False
        if preset not in X264_PRESETS:
            raise VideoFileError(f"unknown preset {preset!r}; expected one of {', '.join(X264_PRESETS)}")
        if format == "mp4" and not 0 <= self.crf <= 51:
            raise VideoFileError(f"crf {crf} is out of range for H.264 (0..51; 17-23 is typical)")
        if not 0 <= self.crf <= 63:
            raise VideoFileError(f"crf {crf} is out of range (0..63)")
        self.audio = None
        if audio is not None:
            if self.spec["audio"] is None:
                raise VideoFileError(
                    f"format {format!r} cannot carry audio; pick mp4, webm or mkv-ffv1, or disconnect the "
                    f"audio input")
            wave, rate = audio
            wave = wave.detach().cpu().float().numpy() if isinstance(wave, torch.Tensor) else np.asarray(
                wave, dtype=np.float32)
            if wave.ndim == 3:
                wave = wave[0]
            if wave.ndim != 2 or wave.shape[0] not in (1, 2):
                raise VideoFileError(f"audio waveform must be [channels (1 or 2), samples]; got shape "
                                     f"{tuple(wave.shape)}")
            self.audio = (np.ascontiguousarray(wave, dtype=np.float32), int(rate))
        self.tmp = temp_path_for(self.path)
        self._container = None
        self._stream = None
        self._astream = None
        self._audio_pos = 0
        self._graph = None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    # -- setup on the first chunk, once the size is known
    def _open(self, height, width):
        self.height, self.width = height, width
        fmt = self.format
        if fmt == "mp4" and (width % 2 or height % 2):
            raise VideoFileError(
                f"H.264 yuv420p needs an even width and height; got {width}x{height}. Crop or pad the "
                f"frames to even sizes (e.g. CVG Load Video's multiple-of-16 option) or use webm/mkv-ffv1.")
        if fmt == "png-sequence":
            os.makedirs(self.tmp)
            return
        options = {}
        if fmt == "mp4":
            options = {"movflags": "use_metadata_tags+faststart"}
        elif fmt in ("gif", "webp"):
            options = {"loop": str(self.loop)}
        self._container = av.open(self.tmp, mode="w", format=self.spec["container"], options=options)
        if fmt in ("mp4", "webm", "mkv-ffv1"):
            for key, value in self.metadata.items():
                self._container.metadata[key] = value
        stream = self._container.add_stream(self.spec["codec"], rate=self.rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = self.spec["pix_fmt"]
        stream.codec_context.time_base = 1 / self.rate
        if fmt == "mp4":
            stream.options = {"crf": str(self.crf), "preset": self.preset}
        elif fmt == "webm":
            stream.options = {"crf": str(self.crf), "b": "0", "cpu-used": str(_VP9_SPEED[self.preset]),
                              "deadline": "good", "row-mt": "1"}
        elif fmt == "webp":
            stream.options = {"quality": str(max(0, 100 - self.crf)), "lossless": "0"}
        elif fmt == "mkv-ffv1":
            stream.options = {"level": "3", "g": "1", "slicecrc": "1"}
        self._stream = stream
        if fmt == "gif":
            self._graph = self._palette_graph(width, height)
        if self.audio is not None:
            wave, rate = self.audio
            codec = self.spec["audio"]
            out_rate = 48000 if codec == "libopus" else rate
            self._astream = self._container.add_stream(codec, rate=out_rate)
            self._astream.layout = "mono" if wave.shape[0] == 1 else "stereo"
            self._resampler = av.AudioResampler(
                format={"aac": "fltp", "libopus": "flt", "flac": "s16"}[codec],
                layout=self._astream.layout.name, rate=out_rate)

    def _palette_graph(self, width, height):
        g = av.filter.Graph()
        src = g.add_buffer(width=width, height=height, format="rgb24", time_base=1 / self.rate)
        split = g.add("split")
        gen = g.add("palettegen", "stats_mode=single")
        use = g.add("paletteuse", "new=1:dither=sierra2_4a")
        sink = g.add("buffersink")
        src.link_to(split)
        split.link_to(use, 0, 0)
        split.link_to(gen, 1, 0)
        gen.link_to(use, 0, 1)
        use.link_to(sink)
        g.configure()
        return g

    def _mux_video(self, frame):
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def _drain_graph(self):
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            self._mux_video(frame)

    def _push_audio(self, until_seconds):
        if self._astream is None:
            return
        wave, rate = self.audio
        end = min(wave.shape[1], int(round(until_seconds * rate)))
        if end <= self._audio_pos:
            return
        chunk = np.ascontiguousarray(wave[:, self._audio_pos:end])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._astream.layout.name)
        frame.sample_rate = rate
        frame.pts = self._audio_pos
        frame.time_base = fractions.Fraction(1, rate)
        self._audio_pos = end
        for resampled in self._resampler.resample(frame):
            for packet in self._astream.encode(resampled):
                self._container.mux(packet)

    def write(self, frames):
        if self.closed:
            raise VideoFileError("write() after close()")
        try:
            arr = to_uint8(frames)
            n, h, w, _ = arr.shape
            if self.width is None:
                self._open(h, w)
            elif (h, w) != (self.height, self.width):
                raise VideoFileError(f"frame size changed from {self.width}x{self.height} to {w}x{h} "
                                     f"within one video; every frame must have the same size")
            for i in range(n):
                index = self.frames_written + i
                if self.format == "png-sequence":
                    self._write_png(arr[i], index)
                    continue
                frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
                frame.pts = index
                frame.time_base = 1 / self.rate
                if self._graph is not None:
                    self._graph.push(frame)
                    self._drain_graph()
                else:
                    self._mux_video(frame)
            self.frames_written += n
            self._push_audio(self.frames_written / self.rate)
        except BaseException:
            self.abort()
            raise

    def _write_png(self, rgb, index):
        from PIL import Image, PngImagePlugin

        info = None
        if index == 0:
            info = PngImagePlugin.PngInfo()
            for key, value in self.metadata.items():
                info.add_text(key, value)
            info.add_text("cvg_fps", repr(self.fps))
        Image.fromarray(rgb, "RGB").save(os.path.join(self.tmp, _PNG_FRAME.format(index + 1)),
                                         pnginfo=info, compress_level=4)

    def close(self):
        """Flush the encoders, embed metadata, move the file into place; returns the final path."""
        if self.closed:
            return self.path
        try:
            if self.frames_written == 0:
                raise VideoFileError("no frames were written; a video needs at least one frame")
            if self._container is not None:
                if self._graph is not None:
                    self._graph.push(None)
                    self._drain_graph()
                self._mux_video(None)
                if self._astream is not None:
                    self._push_audio(self.frames_written / self.rate)
                    for packet in self._astream.encode(None):
                        self._container.mux(packet)
                self._container.close()
                self._container = None
            if self.format == "webp" and self.metadata:
                _webp_add_exif(self.tmp, _comfy_exif(self.metadata))
            elif self.format == "gif" and self.metadata:
                _gif_add_comment(self.tmp, GIF_COMMENT_TAG + json.dumps(self.metadata).encode("utf-8"))
            if os.path.isdir(self.path) and self.format == "png-sequence":
                raise VideoFileError(f"{self.path} already exists")
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.path

    def abort(self):
        """Drop everything written so far (called automatically on errors)."""
        self.closed = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        _remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_video(path, frames, format="mp4", fps=24.0, **kwargs):
    """Write an IMAGE batch, or an iterable of IMAGE chunks, to `path`; returns the path."""
    writer = VideoWriter(path, format=format, fps=fps, **kwargs)
    with writer:
        if isinstance(frames, (torch.Tensor, np.ndarray)):
            writer.write(frames)
        else:
            for chunk in frames:
                writer.write(chunk)
    return writer.path


# ------------------------------------------------------------------------------- metadata side formats

def _comfy_exif(metadata):
    """EXIF bytes (no 'Exif\\0\\0' header) laid out like ComfyUI's SaveAnimatedWEBP."""
    from PIL import Image

    exif = Image.Exif()
    tag = 0x010F
    for key, value in metadata.items():
        if key == "prompt":
            exif[0x0110] = f"prompt:{value}"
        else:
            exif[tag] = f"{key}:{value}"
            tag -= 1
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\x00\x00") else data


def _riff_chunks(data):
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos:pos + 4]
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        yield fourcc, pos, size
        pos += 8 + size + (size & 1)


def _webp_add_exif(path, exif):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise VideoFileError(f"{path} is not a WebP file")
    vp8x = next((pos for fourcc, pos, _ in _riff_chunks(data) if fourcc == b"VP8X"), None)
    if vp8x is None:
        raise VideoFileError("animated WebP without a VP8X header; cannot embed metadata")
    data[vp8x + 8] |= 0x08  # EXIF flag
    chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\x00" if len(exif) & 1 else b"")
    data += chunk
    data[4:8] = struct.pack("<I", len(data) - 8)
    with open(path, "wb") as f:
        f.write(data)


def _gif_add_comment(path, text):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\x3b":
            raise VideoFileError(f"{path} does not end with a GIF trailer; cannot embed metadata")
        f.seek(-1, os.SEEK_END)
        block = bytearray(b"\x21\xfe")
        for i in range(0, len(text), 255):
            part = text[i:i + 255]
            block += bytes([len(part)]) + part
        block += b"\x00\x3b"
        f.write(block)


def _gif_comments(data):
    """All comment-extension payloads of a GIF (walks the block structure)."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        return []
    pos = 13
    flags = data[10]
    if flags & 0x80:
        pos += 3 * (2 << (flags & 7))
    comments = []

    def sub_blocks(p):
        out = bytearray()
        while p < len(data):
            n = data[p]
            p += 1
            if n == 0:
                break
            out += data[p:p + n]
            p += n
        return bytes(out), p

    while pos < len(data):
        b = data[pos]
        if b == 0x3B:
            break
        if b == 0x21:
            label = data[pos + 1]
            payload, pos = sub_blocks(pos + 2)
            if label == 0xFE:
                comments.append(payload)
        elif b == 0x2C:
            lflags = data[pos + 9]
            pos += 10
            if lflags & 0x80:
                pos += 3 * (2 << (lflags & 7))
            pos += 1  # LZW minimum code size
            _, pos = sub_blocks(pos)
        else:
            break
    return comments


def _decode_values(raw):
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def read_metadata(path):
    """Embedded metadata of a file written here (or by ComfyUI's savers) as {key: parsed JSON or str}.
    Keys are lower-case ("prompt", "workflow", ...)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = _png_files(path)
        from PIL import Image

        with Image.open(files[0]) as im:
            raw = {k.lower(): v for k, v in im.info.items() if isinstance(v, str)}
        return _decode_values(raw)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _decode_values(_webp_metadata(path))
    if head[:3] == b"GIF":
        with open(path, "rb") as f:
            data = f.read()
        for comment in _gif_comments(data):
            if comment.startswith(GIF_COMMENT_TAG):
                return _decode_values(json.loads(comment[len(GIF_COMMENT_TAG):].decode("utf-8")))
        return {}
    container = _open_input(path)
    try:
        raw = {k.lower(): v for k, v in container.metadata.items()}
    finally:
        container.close()
    return _decode_values(raw)


def _webp_metadata(path):
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    for fourcc, pos, size in _riff_chunks(data):
        if fourcc == b"EXIF":
            exif_bytes = data[pos + 8:pos + 8 + size]
            exif = Image.Exif()
            exif.load(exif_bytes if exif_bytes.startswith(b"Exif") else b"Exif\x00\x00" + exif_bytes)
            out = {}
            for value in exif.values():
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                if isinstance(value, str) and ":" in value:
                    key, _, rest = value.partition(":")
                    out[key.lower()] = rest
            return out
    return {}


# ----------------------------------------------------------------------------------------------- reader

def _open_input(path):
    if not os.path.exists(path):
        raise VideoFileError(f"video file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise VideoFileError(f"video file {path} is empty (0 bytes); re-export or re-upload it")
    try:
        return av.open(path, mode="r")
    except av.FFmpegError as e:
        raise VideoFileError(
            f"could not open {os.path.basename(path)} as a video ({e}); the file is corrupt or not a "
            f"video. Expected a video or animation such as {', '.join(READABLE_EXTENSIONS[:8])}.") from e


def _png_files(folder):
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    if not files:
        raise VideoFileError(f"folder {folder} contains no .png frames; expected a png sequence")
    return [os.path.join(folder, f) for f in files]


def probe(path):
    """{'width','height','fps','frame_count' (None if the container does not say),'duration','codec'}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoFileError(f"video file {path} does not exist")
    if os.path.isdir(path):
        files = _png_files(path)
        from PIL import Image

        with Image.open(files[0]) as im:
            w, h = im.size
            fps = float(im.info.get("cvg_fps", 24.0))
        return {"width": w, "height": h, "fps": fps, "frame_count": len(files),
                "duration": len(files) / fps, "codec": "png"}
    if _is_webp(path):
        return _webp_probe(path)
    container = _open_input(path)
    try:
        if not container.streams.video:
            raise VideoFileError(f"{os.path.basename(path)} has no video stream (audio-only or data file)")
        vs = container.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else 24.0
        duration = None
        if vs.duration is not None and vs.time_base is not None:
            duration = float(vs.duration * vs.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        return {"width": vs.codec_context.width, "height": vs.codec_context.height, "fps": fps,
                "frame_count": vs.frames or None, "duration": duration, "codec": vs.codec_context.name}
    finally:
        container.close()


def _is_webp(path):
    with open(path, "rb") as f:
        head = f.read(12)
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _webp_probe(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            durations = []
            for i in range(n):
                im.seek(i)
                im.load()
                durations.append(im.info.get("duration", 0) or 0)
            w, h = im.size
    except Exception as e:
        raise VideoFileError(f"could not read {os.path.basename(path)} as WebP ({e}); the file is corrupt")
    total = sum(durations)
    fps = (1000.0 * n / total) if total > 0 else 24.0
    return {"width": w, "height": h, "fps": fps, "frame_count": n, "duration": total / 1000.0,
            "codec": "webp"}


def _iter_source_frames(path, scale_to=None):
    """(time in seconds, uint8 [H,W,3]) for every decoded frame, streamed."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from PIL import Image

        fps = probe(path)["fps"]
        for i, f in enumerate(_png_files(path)):
            with Image.open(f) as im:
                im = im.convert("RGB")
                if scale_to:
                    im = im.resize(scale_to, Image.BICUBIC)
                yield i / fps, np.array(im)
        return
    if _is_webp(path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                t = 0.0
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    im.load()
                    frame = im.convert("RGB")
                    if scale_to:
                        frame = frame.resize(scale_to, Image.BICUBIC)
                    yield t, np.array(frame)
                    t += (im.info.get("duration", 0) or 0) / 1000.0
        except VideoFileError:
            raise
        except Exception as e:
            raise VideoFileError(f"could not decode {os.path.basename(path)} as WebP ({e}); the file is "
                                 f"corrupt or truncated") from e
        return
    container = _open_input(path)
    try:
        if not container.streams.video:
            raise VideoFileError(f"{os.path.basename(path)} has no video stream (audio-only or data file)")
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        rate = vs.average_rate or vs.guessed_rate
        fallback_dt = 1.0 / float(rate) if rate else 1.0 / 24.0
        index = 0
        first_time = None
        try:
            for frame in container.decode(vs):
                t = frame.time
                if t is None:
                    t = index * fallback_dt
                if first_time is None:
                    first_time = t
                kwargs = {"format": "rgb24"}
                if scale_to:
                    kwargs.update(width=scale_to[0], height=scale_to[1], interpolation="BICUBIC")
                yield t - first_time, frame.to_ndarray(**kwargs)
                index += 1
        except av.FFmpegError as e:
            raise VideoFileError(f"{os.path.basename(path)}: decoding failed after {index} frames ({e}); "
                                 f"the file is corrupt or truncated") from e
    finally:
        container.close()


def _fit(frame, multiple, mode):
    if not multiple or multiple <= 1:
        return frame
    h, w = frame.shape[:2]
    if mode == "crop":
        nh, nw = h // multiple * multiple, w // multiple * multiple
        if nh == 0 or nw == 0:
            raise VideoFileError(f"frames of {w}x{h} are smaller than {multiple} px; cannot crop to a "
                                 f"multiple of {multiple}. Use fit='pad'.")
        top, left = (h - nh) // 2, (w - nw) // 2
        return frame[top:top + nh, left:left + nw]
    if mode == "pad":
        nh, nw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        if (nh, nw) == (h, w):
            return frame
        out = np.zeros((nh, nw, 3), dtype=frame.dtype)
        top, left = (nh - h) // 2, (nw - w) // 2
        out[top:top + h, left:left + w] = frame
        return out
    raise VideoFileError(f"fit must be 'crop' or 'pad'; got {mode!r}")


class VideoReader:
    """Streaming decoder with frame selection; frames never all exist at full resolution at once.

    Order of operations (like VideoHelperSuite): force_fps resampling, skip_first, every_nth,
    frame_cap, snap_4k1 (drop the last 1-3 frames so the count is 4k+1). Per frame: optional downscale
    so the longer side is at most max_side, then crop or pad to a multiple of `multiple` (centred;
    padding is black).
    """

    def __init__(self, path, frame_cap=0, skip_first=0, every_nth=1, force_fps=0.0, multiple=0, fit="crop",
                 snap_4k1=False, max_side=0, chunk_size=16):
        self.path = os.fspath(path)
        for name, value, low in (("frame_cap", frame_cap, 0), ("skip_first", skip_first, 0),
                                 ("every_nth", every_nth, 1), ("multiple", multiple, 0),
                                 ("max_side", max_side, 0), ("chunk_size", chunk_size, 1)):
            if int(value) != value or value < low:
                raise VideoFileError(f"{name} must be an integer >= {low}; got {value!r}")
        if force_fps < 0:
            raise VideoFileError(f"force_fps must be 0 (keep) or positive; got {force_fps}")
        if fit not in ("crop", "pad"):
            raise VideoFileError(f"fit must be 'crop' or 'pad'; got {fit!r}")
        self.frame_cap, self.skip_first, self.every_nth = int(frame_cap), int(skip_first), int(every_nth)
        self.force_fps, self.multiple, self.fit = float(force_fps), int(multiple), fit
        self.snap_4k1, self.max_side, self.chunk_size = bool(snap_4k1), int(max_side), int(chunk_size)
        self.info = probe(self.path)
        src_fps = self.info["fps"]
        self.fps = (self.force_fps or src_fps) / self.every_nth
        self.scale_to = None
        w, h = self.info["width"], self.info["height"]
        if self.max_side and max(w, h) > self.max_side:
            s = self.max_side / max(w, h)
            self.scale_to = (max(1, round(w * s)), max(1, round(h * s)))
        self.frame_count = 0

    def _resampled(self):
        source = _iter_source_frames(self.path, self.scale_to)
        if not self.force_fps:
            yield from (f for _, f in source)
            return
        step = 1.0 / self.force_fps
        next_t = 0.0
        last = None
        last_t = None
        src_dt = 1.0 / self.info["fps"]
        # containers round timestamps (Matroska: whole ms); tolerate that much jitter
        eps = min(2e-3, 0.25 * min(step, src_dt))
        for t, frame in source:
            if last is not None:
                while next_t < t - eps:
                    yield last
                    next_t += step
            last, last_t = frame, t
        if last is not None:
            end = last_t + src_dt
            while next_t < end - eps:
                yield last
                next_t += step

    def _selected(self):
        kept = 0
        for i, frame in enumerate(self._resampled()):
            if i < self.skip_first or (i - self.skip_first) % self.every_nth:
                continue
            yield _fit(frame, self.multiple, self.fit)
            kept += 1
            if self.frame_cap and kept >= self.frame_cap:
                return

    def _snapped(self):
        if not self.snap_4k1:
            yield from self._selected()
            return
        pending = []
        for i, frame in enumerate(self._selected()):
            if i == 0:
                yield frame
                continue
            pending.append(frame)
            if i % 4 == 0:
                yield from pending
                pending = []

    def iter_frames(self):
        """uint8 [H,W,3] numpy frames after selection."""
        self.frame_count = 0
        for frame in self._snapped():
            self.frame_count += 1
            yield frame
        if self.frame_count == 0:
            raise VideoFileError(
                f"{os.path.basename(self.path)}: no frames left (the file has "
                f"{self.info.get('frame_count') or 'no decodable'} frames; skip_first={self.skip_first}, "
                f"every_nth={self.every_nth}, frame_cap={self.frame_cap}). Lower skip_first or check the "
                f"file.")

    def iter_chunks(self):
        """IMAGE chunks: float32 torch [n,H,W,3] in 0..1, at most chunk_size frames each."""
        batch = []
        for frame in self.iter_frames():
            batch.append(frame)
            if len(batch) == self.chunk_size:
                yield torch.from_numpy(np.stack(batch)).float().div_(255.0)
                batch = []
        if batch:
            yield torch.from_numpy(np.stack(batch)).float().div_(255.0)

    def read(self):
        """The whole selection as one IMAGE tensor. Frames are held as uint8 while decoding and expanded
        to float32 once at the end (peak ~1.25x the output size)."""
        frames = list(self.iter_frames())
        out = torch.empty((len(frames),) + frames[0].shape, dtype=torch.float32)
        for i, frame in enumerate(frames):
            out[i] = torch.from_numpy(frame)
            frames[i] = None
        return out.div_(255.0)


def read_video(path, **kwargs):
    """(IMAGE float32 [T,H,W,3], fps) for the selection described by VideoReader's keyword arguments."""
    reader = VideoReader(path, **kwargs)
    return reader.read(), reader.fps
