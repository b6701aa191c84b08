"""models/video_files.py: round trips through every format, metadata, bad files, partial-file cleanup,
reader frame selection, flat memory when streaming.

Oracles: the quantised input frames themselves (exact for the lossless formats, PSNR bounds for the lossy
ones), plain numpy slicing of a full lossless decode for the reader's selection options, and peak RSS of
a child process for the memory claims.
"""
import json
import os
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import torch

from models import video_files as vf

FPS = 12
# Lowest PSNR (dB) accepted per lossy format on the smooth test clip at its default quality
# (mp4/webm crf 19, webp quality 81, gif 256 colours per frame with dithering).
PSNR_BOUND = {"mp4": 34.0, "webm": 34.0, "webp": 33.0, "gif": 28.0}
META = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}},
        "workflow": {"last_node_id": 3, "nodes": [{"id": 3, "type": "KSampler"}], "note": "ünïcödé"}}


def clip(t=9, h=48, w=64, seed=0):
    """A smooth moving test clip, already on the 8-bit grid (so lossless means bit-exact)."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 6
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None]
    frames = []
    for i in range(t):
        chans = [0.5 + 0.35 * torch.sin(3 * x + 2 * y + 0.25 * i + phase[c]) for c in range(3)]
        frames.append(torch.stack(chans, -1))
    return (torch.stack(frames) * 255).round() / 255


def out_path(tmp_path, fmt, name="clip"):
    return str(tmp_path / (name + vf.FORMATS[fmt]["ext"]))


def expected_fps(fmt, fps):
    if fmt == "gif":  # centisecond delays
        return 100.0 / round(100.0 / fps)
    return float(fps)


@pytest.mark.parametrize("fmt", list(vf.FORMATS))
def test_round_trip(tmp_path, fmt):
    frames = clip()
    path = vf.write_video(out_path(tmp_path, fmt), frames, format=fmt, fps=FPS)
    assert os.path.exists(path)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    out, fps = vf.read_video(path)
    assert out.dtype == torch.float32 and out.shape == frames.shape
    if fmt == "webp":  # frame timestamps are whole milliseconds: mean duration within 1 ms
        assert 1000 / fps == pytest.approx(1000 / FPS, abs=1.0)
    else:
        assert fps == pytest.approx(expected_fps(fmt, FPS), rel=1e-3)
    info = vf.probe(path)
    assert (info["width"], info["height"]) == (64, 48)
    if vf.FORMATS[fmt]["lossless"]:
        assert torch.equal(out, frames)
    else:
        assert vf.psnr(out, frames) > PSNR_BOUND[fmt]
        assert not torch.equal(out, frames)  # it really went through the lossy codec


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_crf_controls_quality(tmp_path, fmt):
    frames = clip(t=5, seed=1)
    good = vf.read_video(vf.write_video(out_path(tmp_path, fmt, "a"), frames, format=fmt, fps=FPS, crf=10))[0]
    bad = vf.read_video(vf.write_video(out_path(tmp_path, fmt, "b"), frames, format=fmt, fps=FPS, crf=45))[0]
    assert vf.psnr(good, frames) > vf.psnr(bad, frames) + 3


@pytest.mark.parametrize("fmt", list(vf.FORMATS))
def test_metadata_round_trip(tmp_path, fmt):
    path = vf.write_video(out_path(tmp_path, fmt), clip(t=3), format=fmt, fps=FPS, metadata=META)
    meta = vf.read_metadata(path)
    assert meta["prompt"] == META["prompt"]
    assert meta["workflow"] == META["workflow"]


def test_mp4_metadata_is_container_metadata(tmp_path):
    """What ComfyUI's frontend reads on drop: mp4 udta/meta keys 'prompt' and 'workflow'."""
    path = vf.write_video(out_path(tmp_path, "mp4"), clip(t=3), format="mp4", fps=FPS, metadata=META)
    with av.open(path) as c:
        assert json.loads(c.metadata["workflow"]) == META["workflow"]
    with open(path, "rb") as f:
        data = f.read()
    # use_metadata_tags layout, in the order the current frontend's ISOBMFF reader walks it, and moved
    # before the media data (faststart) so a reader of the first bytes finds it
    pos = [data.find(box) for box in (b"moov", b"udta", b"meta", b"mdta", b"keys", b"ilst", b"data", b"mdat")]
    assert -1 not in pos and pos == sorted(pos), pos


def test_webp_exif_layout_matches_comfyui(tmp_path):
    from PIL import Image

    path = vf.write_video(out_path(tmp_path, "webp"), clip(t=3), format="webp", fps=FPS, metadata=META)
    with Image.open(path) as im:
        assert im.n_frames == 3
        exif = im.getexif()
    assert exif[0x0110].startswith("prompt:") and json.loads(exif[0x0110][7:]) == META["prompt"]
    assert exif[0x010F].startswith("workflow:") and json.loads(exif[0x010F][9:]) == META["workflow"]


def test_png_sequence_first_frame_carries_comfy_text_chunks(tmp_path):
    from PIL import Image

    path = vf.write_video(str(tmp_path / "seq"), clip(t=3), format="png-sequence", fps=FPS, metadata=META)
    files = sorted(os.listdir(path))
    assert files == ["frame_000001.png", "frame_000002.png", "frame_000003.png"]
    with Image.open(os.path.join(path, files[0])) as im:
        assert json.loads(im.info["workflow"]) == META["workflow"]


@pytest.mark.parametrize("fmt,codec", [("mp4", "aac"), ("webm", "opus"), ("mkv-ffv1", "flac")])
def test_audio_passthrough(tmp_path, fmt, codec):
    rate = 16000
    t = np.arange(rate * 2) / rate  # 2 s of audio for a 0.75 s clip -> trimmed to the video length
    wave = torch.from_numpy(np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)])).float()
    path = vf.write_video(out_path(tmp_path, fmt), clip(t=9), format=fmt, fps=FPS, audio=(wave * 0.5, rate))
    with av.open(path) as c:
        assert c.streams.audio and c.streams.audio[0].codec_context.name == codec
        assert c.streams.audio[0].codec_context.channels == 2
        samples = sum(f.samples for f in c.decode(audio=0))
        sr = c.streams.audio[0].codec_context.sample_rate
    duration = samples / sr
    assert 0.6 < duration < 0.95, duration  # video is 9/12 = 0.75 s
    assert vf.read_video(path)[0].shape[0] == 9


@pytest.mark.parametrize("fmt", ["gif", "webp", "png-sequence"])
def test_audio_rejected_where_format_cannot_carry_it(tmp_path, fmt):
    with pytest.raises(vf.VideoFileError, match="cannot carry audio"):
        vf.VideoWriter(out_path(tmp_path, fmt), format=fmt, fps=FPS, audio=(torch.zeros(1, 100), 8000))


def test_streaming_chunks_equal_one_shot(tmp_path):
    frames = clip(t=13)
    a = vf.write_video(out_path(tmp_path, "mkv-ffv1", "a"), frames, format="mkv-ffv1", fps=FPS)
    b = vf.write_video(out_path(tmp_path, "mkv-ffv1", "b"), (frames[i:i + 4] for i in range(0, 13, 4)),
                       format="mkv-ffv1", fps=FPS)
    assert torch.equal(vf.read_video(a)[0], vf.read_video(b)[0])
    chunks = list(vf.VideoReader(b, chunk_size=5).iter_chunks())
    assert [c.shape[0] for c in chunks] == [5, 5, 3]
    assert torch.equal(torch.cat(chunks), frames)


# ------------------------------------------------------------------------------------------- failures

def test_no_partial_file_when_encoding_fails_midway(tmp_path):
    path = out_path(tmp_path, "mp4")

    def chunks():
        yield clip(t=4)
        yield clip(t=4, h=32)  # size changes -> error in the second chunk

    with pytest.raises(vf.VideoFileError, match="frame size changed"):
        vf.write_video(path, chunks(), format="mp4", fps=FPS)
    assert os.listdir(tmp_path) == []


def test_no_partial_file_when_caller_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with vf.VideoWriter(out_path(tmp_path, "mkv-ffv1"), format="mkv-ffv1", fps=FPS) as w:
            w.write(clip(t=3))
            assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].startswith(".")
            raise RuntimeError("decoder crashed")
    assert os.listdir(tmp_path) == []


def test_png_sequence_failure_leaves_nothing(tmp_path):
    def chunks():
        yield clip(t=2)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        vf.write_video(str(tmp_path / "seq"), chunks(), format="png-sequence", fps=FPS)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "avi"}, "unknown video format"),
    ({"format": "mp4", "crf": 60}, "out of range for H.264"),
    ({"format": "mp4", "preset": "warp"}, "unknown preset"),
    ({"format": "mp4", "fps": 0}, "fps must be a positive number"),
])
def test_bad_writer_settings(tmp_path, kwargs, match):
    with pytest.raises(vf.VideoFileError, match=match):
        vf.VideoWriter(str(tmp_path / "x.mp4"), **kwargs)


def test_odd_size_mp4_rejected_cleanly(tmp_path):
    with pytest.raises(vf.VideoFileError, match="even width and height"):
        vf.write_video(out_path(tmp_path, "mp4"), clip(t=2, h=47), format="mp4", fps=FPS)
    assert os.listdir(tmp_path) == []


def test_empty_and_rgba_inputs_rejected(tmp_path):
    with pytest.raises(vf.VideoFileError, match="no frames"):
        vf.write_video(out_path(tmp_path, "mp4"), iter([]), format="mp4", fps=FPS)
    with pytest.raises(vf.VideoFileError, match="RGBA"):
        vf.write_video(out_path(tmp_path, "mp4"), torch.zeros(2, 8, 8, 4), format="mp4", fps=FPS)
    assert os.listdir(tmp_path) == []


def test_bad_files_rejected(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(vf.VideoFileError, match="empty"):
        vf.read_video(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(vf.VideoFileError, match="corrupt or not a video"):
        vf.read_video(str(junk))
    text = tmp_path / "notes.webm"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(vf.VideoFileError, match="corrupt or not a video"):
        vf.read_video(str(text))
    with pytest.raises(vf.VideoFileError, match="does not exist"):
        vf.read_video(str(tmp_path / "missing.mp4"))


def test_audio_only_file_rejected(tmp_path):
    path = str(tmp_path / "tone.wav")
    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    with pytest.raises(vf.VideoFileError, match="no video stream"):
        vf.read_video(path)


def test_corrupted_payload_rejected(tmp_path):
    """A real file whose frame data is overwritten: either a decode error or a clear open error,
    never frames silently made up."""
    path = vf.write_video(out_path(tmp_path, "webp"), clip(t=4), format="webp", fps=FPS)
    data = bytearray(open(path, "rb").read())
    data[60:] = bytes(len(data) - 60)  # zero everything after the headers
    open(path, "wb").write(data)
    with pytest.raises(vf.VideoFileError, match="corrupt"):
        vf.read_video(path)


# ------------------------------------------------------------------------------------------ selection

@pytest.fixture(scope="module")
def lossless_file(tmp_path_factory):
    frames = clip(t=23, h=40, w=56, seed=3)
    path = vf.write_video(str(tmp_path_factory.mktemp("sel") / "src.mkv"), frames, format="mkv-ffv1", fps=FPS)
    return path, frames


@pytest.mark.parametrize("skip,nth,cap,snap", [(0, 1, 0, False), (3, 1, 0, False), (2, 3, 0, False),
                                               (1, 2, 5, False), (0, 1, 0, True), (1, 1, 0, True),
                                               (2, 2, 0, True), (0, 1, 12, True)])
def test_selection_matches_slicing(lossless_file, skip, nth, cap, snap):
    path, frames = lossless_file
    out, fps = vf.read_video(path, skip_first=skip, every_nth=nth, frame_cap=cap, snap_4k1=snap,
                             chunk_size=4)
    want = frames[skip::nth]
    if cap:
        want = want[:cap]
    if snap:
        want = want[:(len(want) - 1) // 4 * 4 + 1]
        assert (len(want) - 1) % 4 == 0
    assert torch.equal(out, want)
    assert fps == pytest.approx(FPS / nth)


def test_force_fps(lossless_file):
    path, frames = lossless_file
    up, fps = vf.read_video(path, force_fps=2 * FPS)
    assert fps == 2 * FPS
    assert torch.equal(up, frames.repeat_interleave(2, dim=0))
    down, fps = vf.read_video(path, force_fps=FPS / 2)
    assert fps == FPS / 2
    assert torch.equal(down, frames[::2])


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_multiple_of_16(lossless_file, fit):
    path, frames = lossless_file  # 40 x 56
    out, _ = vf.read_video(path, multiple=16, fit=fit)
    if fit == "crop":
        assert out.shape[1:3] == (32, 48)
        assert torch.equal(out, frames[:, 4:36, 4:52])
    else:
        assert out.shape[1:3] == (48, 64)
        assert torch.equal(out[:, 4:44, 4:60], frames)
        assert out[:, :4].abs().sum() == 0 and out[:, :, :4].abs().sum() == 0


def test_max_side_downscales_in_decoder(lossless_file):
    path, frames = lossless_file
    out, _ = vf.read_video(path, max_side=28, multiple=8, fit="crop")
    assert out.shape[1:3] == (16, 24)  # 20x28 after scaling, then cropped to multiples of 8
    small = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(20, 28), mode="area")
    small = small.permute(0, 2, 3, 1)[:, 2:18, 2:26]
    assert vf.psnr(out, small) > 25


def test_selection_that_leaves_nothing_is_an_error(lossless_file):
    path, _ = lossless_file
    with pytest.raises(vf.VideoFileError, match="no frames left"):
        vf.read_video(path, skip_first=500)
    with pytest.raises(vf.VideoFileError, match="every_nth"):
        vf.VideoReader(path, every_nth=0)


# -------------------------------------------------------------------------------------------- memory

_MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np
    from models import video_files as vf
    n, path = int(sys.argv[1]), sys.argv[2]
    def chunks():
        rng = np.random.default_rng(0)
        base = rng.random((1, 256, 256, 3), dtype=np.float32)
        for i in range(0, n, 8):
            yield np.roll(base, i, axis=2).repeat(min(8, n - i), axis=0)
    vf.write_video(path, chunks(), format="mp4", fps=24, preset="ultrafast")
    count = sum(c.shape[0] for c in vf.VideoReader(path, chunk_size=8).iter_chunks())
    assert count == n, count
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


# glibc keeps freed large blocks in its heap (dynamic mmap threshold), which makes peak RSS jump by tens
# of MiB at random; a fixed mmap threshold returns them to the OS at once, so RSS follows live memory.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def _peak_rss_mib(n, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n), str(tmp_path / f"m{n}.mp4")],
                         cwd=root, env={**os.environ, **_MALLOC_ENV, "PYTHONPATH": root}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_streaming_memory_is_flat_in_frame_count(tmp_path):
    """Write then stream-read 24 vs 480 frames of 256x256. The float32 IMAGE for 480 frames alone would
    be 360 MiB; the streaming peak may differ by far less than that."""
    short = _peak_rss_mib(24, tmp_path)
    long = _peak_rss_mib(480, tmp_path)
    full_tensor_mib = 480 * 256 * 256 * 3 * 4 / 2 ** 20
    print(f"peak RSS: 24 frames {short} MiB, 480 frames {long} MiB (full IMAGE would be {full_tensor_mib:.0f} MiB)")
    assert long - short < 40, (short, long)


_DECODE_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from models import video_files as vf
    from models.wan import vae as wv
    t, folder = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)  # per-thread allocator arenas appear at random times otherwise
    torch.manual_seed(0)
    model = wv.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True]).eval()

    def decode_to_file(frames_latent, name):
        z = torch.randn(1, 16, frames_latent, 16, 16)
        biggest = 0
        with torch.inference_mode(), vf.VideoWriter(f"{folder}/{name}.mp4", format="mp4", fps=16,
                                                    preset="ultrafast") as w:
            for chunk in model.decode_stream(z):  # [1,3,n,128,128] in -1..1
                frames = ((chunk[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
                biggest = max(biggest, frames.shape[0])
                w.write(frames)
                del chunk, frames
        assert w.frames_written == 4 * (frames_latent - 1) + 1 and biggest <= 4

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    decode_to_file(6, "warm")  # allocator, encoder pipeline and model warm-up (21 frames)
    base = peak()
    decode_to_file(t, "long")
    print(peak() - base)
""")


def test_decode_to_file_memory_is_flat_in_clip_length(tmp_path):
    """Wan-VAE decode_stream (tiny random model, 128x128) encoded to mp4 as the chunks come, as CVG Decode
    To Video does. After a 21-frame warm-up decode, decoding a 93-frame clip may raise the peak RSS by
    less than 8 MiB; decoding the whole clip first would hold at least two float32 copies of it
    (decoder output + IMAGE), ~35 MiB."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t = 24
    out = subprocess.run([sys.executable, "-c", _DECODE_SCRIPT, str(t), str(tmp_path)], cwd=root,
                         env={**os.environ, **_MALLOC_ENV, "PYTHONPATH": root}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.strip().splitlines()[-1])
    frames = 4 * (t - 1) + 1
    assert vf.probe(str(tmp_path / "long.mp4"))["frame_count"] == frames
    copy_mib = frames * 128 * 128 * 3 * 4 / 2 ** 20
    print(f"decode-to-file: peak RSS grew {growth:.1f} MiB for {frames} frames after warm-up "
          f"(one float32 copy of the clip: {copy_mib:.0f} MiB)")
    assert growth < 8, growth


@pytest.mark.parametrize("fmt", ["webm", "mkv-ffv1"])
def test_matroska_tags_precede_media(tmp_path, fmt):
    """The current frontend reads WebM tags from the first 2 MiB: PROMPT / WORKFLOW SimpleTags must sit in
    the header, before the first Cluster, however long the clip."""
    path = vf.write_video(out_path(tmp_path, fmt), clip(t=30), format=fmt, fps=FPS, metadata=META)
    data = open(path, "rb").read()
    cluster = data.find(b"\x1f\x43\xb6\x75")
    assert 0 < data.find(b"PROMPT") < cluster and 0 < data.find(b"WORKFLOW") < cluster
