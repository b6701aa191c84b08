"""CVG Save Video / CVG Load Video / CVG Decode To Video through a real ComfyUI server (the `comfy` fixture).

Oracle: the source clip the test writes itself (lossless ffv1) and models/video_files.py's reader on the
files the server wrote; PSNR bounds for lossy formats, exact equality for lossless ones.
"""
import os

import pytest
import torch

from models import video_files as vf

FPS = 8.0
PSNR_BOUND = {"mp4": 32.0, "webm": 32.0, "webp": 30.0, "gif": 26.0}


def source_clip(t=9, h=48, w=64):
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None]
    frames = [torch.stack([0.5 + 0.35 * torch.sin(3 * x + 2 * y + 0.3 * i + c) for c in range(3)], -1)
              for i in range(t)]
    return (torch.stack(frames) * 255).round() / 255


@pytest.fixture(scope="module")
def src(comfy):
    frames = source_clip()
    path = vf.write_video(str(comfy.input_dir / "cvg_src.mkv"), frames, format="mkv-ffv1", fps=FPS)
    return os.path.basename(path), frames


def load_node(video, **kw):
    inputs = {"video": video, "frame_cap": 0, "skip_first": 0, "every_nth": 1, "force_fps": 0.0,
              "resize": "none", "max_side": 0, "snap_4k1": False}
    inputs.update(kw)
    return {"class_type": "CVGLoadVideo", "inputs": inputs}


def save_node(images, prefix, fmt, fps=FPS, crf=19, preset="veryfast"):
    return {"class_type": "CVGSaveVideo", "inputs": {"images": images, "filename_prefix": prefix, "format": fmt,
                                                     "fps": fps, "crf": crf, "preset": preset}}


def saved(comfy, outputs, node_id):
    entry = outputs[node_id]["cvg_video"][0]
    path = comfy.output_dir / entry["subfolder"] / entry["filename"]
    assert path.exists(), path
    return entry, str(path)


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for node in ("CVGSaveVideo", "CVGDecodeToVideo", "CVGLoadVideo"):
        assert node in info, node
    assert not [line for line in comfy.import_failures() if "comfyui-cvg" in line or "cvg" in line.lower()]
    save = info["CVGSaveVideo"]["input"]
    assert list(save["required"]) == ["images", "filename_prefix", "format", "fps", "crf", "preset"]
    assert save["required"]["format"][0] == list(vf.FORMATS)
    assert info["CVGSaveVideo"]["output_node"] is True
    assert info["CVGLoadVideo"]["output"] == ["IMAGE", "FLOAT", "INT"]


def test_load_lists_input_videos(comfy, src):
    name, _ = src
    (comfy.input_dir / "notes.txt").write_text("not a video")
    choices = comfy.object_info()["CVGLoadVideo"]["input"]["required"]["video"][0]
    assert name in choices and "notes.txt" not in choices


@pytest.mark.parametrize("fmt", list(vf.FORMATS))
def test_save_each_format_and_load_back(comfy, src, fmt):
    name, frames = src
    prefix = f"cvgtest/{fmt}"
    prompt = {"1": load_node(name), "2": save_node(["1", 0], prefix, fmt)}
    entry, path = saved(comfy, comfy.run(prompt), "2")
    base = os.path.basename(prefix)
    assert entry["filename"] == f"{base}_00001_{vf.FORMATS[fmt]['ext']}"
    assert entry["subfolder"] == "cvgtest" and entry["type"] == "output" and entry["frames"] == 9
    out, fps = vf.read_video(path)
    assert out.shape == frames.shape
    if vf.FORMATS[fmt]["lossless"]:
        assert torch.equal(out, frames)
    else:
        assert vf.psnr(out, frames) > PSNR_BOUND[fmt]
    if fmt not in ("gif", "webp"):
        assert fps == pytest.approx(FPS)
    meta = vf.read_metadata(path)
    assert meta["prompt"]["2"]["class_type"] == "CVGSaveVideo"
    assert meta["prompt"]["2"]["inputs"]["format"] == fmt

    # Load the saved file back through the server (ComfyUI's "[output]" annotation) and re-save it
    # losslessly: what CVG Load Video produced must equal what the reader sees in the file.
    rel = f"{entry['subfolder']}/{entry['filename']} [output]"
    # fps comes from the loader's FLOAT output (a link into the saver's fps widget)
    again = comfy.run({"1": load_node(rel), "2": save_node(["1", 0], "cvgtest/reload", "mkv-ffv1", fps=["1", 1])})
    _, path2 = saved(comfy, again, "2")
    reloaded, fps2 = vf.read_video(path2)
    assert torch.equal(reloaded, out)
    assert fps2 == pytest.approx(fps, rel=1e-3)

    # A second save with the same prefix gets the next counter, never overwrites.
    entry2, _ = saved(comfy, comfy.run(prompt), "2")
    assert entry2["filename"] == f"{base}_00002_{vf.FORMATS[fmt]['ext']}"


def test_ui_preview_entries(comfy, src):
    name, _ = src
    out = comfy.run({"1": load_node(name), "2": save_node(["1", 0], "cvgtest/ui", "webp"),
                     "3": save_node(["1", 0], "cvgtest/ui", "mp4")})
    assert out["2"]["images"][0]["filename"].endswith(".webp")  # native <img> preview
    assert out["3"]["cvg_video"][0]["mime"] == "video/mp4" and out["3"]["cvg_video"][0]["playable"]
    assert "images" not in out["3"]  # an <img> cannot show mp4: js/cvg.js plays it instead


def test_empty_image_graph_to_mp4(comfy):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 32, "batch_size": 5,
                                                           "color": 0x3366CC}},
              "2": save_node(["1", 0], "cvgtest/empty", "mp4")}
    _, path = saved(comfy, comfy.run(prompt), "2")
    out, _ = vf.read_video(path)
    assert out.shape == (5, 32, 64, 3)
    want = torch.tensor([0x33, 0x66, 0xCC]) / 255
    assert (out.mean(dim=(0, 1, 2)) - want).abs().max() < 3 / 255


def test_load_options_through_server(comfy, src):
    name, frames = src
    odd = source_clip(t=9, h=40, w=56)
    vf.write_video(str(comfy.input_dir / "cvg_odd.mkv"), odd, format="mkv-ffv1", fps=FPS)
    prompt = {"1": load_node("cvg_odd.mkv", skip_first=1, every_nth=2, resize="crop to multiple of 16"),
              "2": save_node(["1", 0], "cvgtest/opts", "mkv-ffv1", fps=["1", 1])}
    _, path = saved(comfy, comfy.run(prompt), "2")
    out, fps = vf.read_video(path)
    assert torch.equal(out, odd[1::2, 4:36, 4:52])  # 40x56 -> 32x48 centred crop; frames 1,3,5,7
    assert fps == pytest.approx(FPS / 2)
    prompt["1"]["inputs"]["resize"] = "pad to multiple of 16"
    _, path = saved(comfy, comfy.run(prompt), "2")
    out, _ = vf.read_video(path)
    assert out.shape[1:3] == (48, 64) and torch.equal(out[:, 4:44, 4:60], odd[1::2])
    prompt = {"1": load_node(name, snap_4k1=True, frame_cap=8),
              "2": save_node(["1", 0], "cvgtest/opts", "mkv-ffv1")}
    _, path = saved(comfy, comfy.run(prompt), "2")
    assert vf.read_video(path)[0].shape[0] == 5


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/cvg_escape", "a/../../escape", "..\\escape",
                                    "C:\\escape", "~/escape"])
def test_path_escapes_rejected(comfy, src, prefix):
    name, _ = src
    before = set(os.listdir(comfy.output_dir.parent))
    err = comfy.run_expect_error({"1": load_node(name), "2": save_node(["1", 0], prefix, "gif")})
    assert "not allowed" in err
    assert set(os.listdir(comfy.output_dir.parent)) == before
    assert not os.path.exists("/tmp/cvg_escape_00001_.gif")


def test_bad_files_rejected_through_server(comfy):
    (comfy.input_dir / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))
    err = comfy.run_expect_error({"1": load_node("broken.mp4"), "2": save_node(["1", 0], "cvgtest/x", "gif")})
    assert "corrupt" in err
    (comfy.input_dir / "empty.webm").write_bytes(b"")
    err = comfy.run_expect_error({"1": load_node("empty.webm"), "2": save_node(["1", 0], "cvgtest/x", "gif")})
    assert "empty" in err
    err = comfy.run_expect_error({"1": load_node("missing.mp4"), "2": save_node(["1", 0], "cvgtest/x", "gif")})
    assert "not found" in err
    err = comfy.run_expect_error({"1": load_node("../secret.mp4"), "2": save_node(["1", 0], "cvgtest/x", "gif")})
    assert "outside" in err
    leftovers = [p for p in comfy.output_files() if p.name.startswith(".") or p.name.endswith(".partial")]
    assert leftovers == []


def test_audio_input_is_optional_audio(comfy):
    """The March-2024 host has no node producing AUDIO, so audio muxing itself is tested in
    tests/models/test_video_files.py; here only the declared socket is checked."""
    info = comfy.object_info()["CVGSaveVideo"]["input"]
    assert info["optional"]["audio"][0] == "AUDIO"
    assert "audio" not in info["required"]


# ------------------------------------------------------------------------------ CVG Decode To Video

VAE_CFG = dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
VAE_FILE = "cvg_video_io_tiny_vae.safetensors"


@pytest.fixture(scope="module")
def tiny_vae(comfy):
    from models.wan import vae as wv
    from models.wan import vae_loading as vl

    torch.manual_seed(5)
    model = wv.WanVAE(**VAE_CFG).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # random everywhere, including zero-initialised parameters
            p.copy_(torch.randn_like(p) * 0.2)
    vl.save_wan_vae(model, comfy.models_dir / "vae" / VAE_FILE)
    frames = source_clip(t=9, h=32, w=48)
    vf.write_video(str(comfy.input_dir / "cvg_vae_clip.mkv"), frames, format="mkv-ffv1", fps=FPS)
    return model, frames


def test_decode_to_video_equals_decode_then_save(comfy, tiny_vae):
    """Streaming decode-to-file gives exactly the frames of CVG VAE Decode -> CVG Save Video (lossless),
    and the same frames as decoding the latent in this process."""
    model, frames = tiny_vae
    prompt = {
        "1": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE_FILE, "dtype": "fp32", "device": "auto"}},
        "2": load_node("cvg_vae_clip.mkv"),
        "3": {"class_type": "CVGVAEEncode", "inputs": {"vae": ["1", 0], "images": ["2", 0]}},
        "4": {"class_type": "CVGDecodeToVideo", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                           "filename_prefix": "cvgtest/d2v", "format": "mkv-ffv1",
                                                           "fps": FPS, "crf": 19, "preset": "medium"}},
        "5": {"class_type": "CVGVAEDecode", "inputs": {"vae": ["1", 0], "samples": ["3", 0], "tiling": "off",
                                                       "tile_size": 512, "tile_overlap": 64}},
        "6": save_node(["5", 0], "cvgtest/d2v_ref", "mkv-ffv1"),
        "7": {"class_type": "CVGDecodeToVideo", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                           "filename_prefix": "cvgtest/d2v", "format": "mp4",
                                                           "fps": FPS, "crf": 19, "preset": "veryfast"}},
    }
    out = comfy.run(prompt)
    entry, path = saved(comfy, out, "4")
    _, ref_path = saved(comfy, out, "6")
    streamed, fps = vf.read_video(path)
    reference, _ = vf.read_video(ref_path)
    assert streamed.shape == (9, 32, 48, 3) and fps == pytest.approx(FPS)
    assert torch.equal(streamed, reference)
    with torch.no_grad():
        video = model.decode(model.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1))
    local = ((video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    assert (streamed - local).abs().max() <= 1.01 / 255  # 8-bit quantisation only
    assert vf.read_metadata(path)["prompt"]["4"]["class_type"] == "CVGDecodeToVideo"
    _, mp4 = saved(comfy, out, "7")
    assert out["7"]["cvg_video"][0]["mime"] == "video/mp4"
    # a random-weight decoder outputs high-frequency noise: H.264 4:2:0 at crf 19 keeps ~29 dB of it
    assert vf.psnr(vf.read_video(mp4)[0], reference) > 25


def test_decode_to_video_rejects_image_latent(comfy, tiny_vae):
    prompt = {
        "1": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE_FILE, "dtype": "fp32", "device": "auto"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CVGDecodeToVideo", "inputs": {"samples": ["2", 0], "vae": ["1", 0],
                                                           "filename_prefix": "cvgtest/bad", "format": "mp4",
                                                           "fps": FPS, "crf": 19, "preset": "medium"}},
    }
    err = comfy.run_expect_error(prompt)
    assert "Wan video LATENT" in err
    assert not [p for p in comfy.output_files() if p.name.startswith("bad_")]
