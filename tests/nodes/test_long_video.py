"""Long-video nodes through a real ComfyUI server (the `comfy` fixture), with tiny random Wan files.

Oracles: models/long_video.py formulas (perturbation, plan totals), the DiT engineer's
models/wan/pipeline.py sampling (segment 0 of a long video is plain T2V) and the VAE engineer's
models/wan/vae.py (seam error = mean |decode(encode(tail)) − tail|, by the causality of both directions).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import long_video as LV
from models import sampling
from models.wan import latent as wan_latent
from host.random_weights import tiny_dit_state, tiny_vae

T2V = "cvg_lv_t2v_tiny.safetensors"
I2V = "cvg_lv_i2v_tiny.safetensors"
VAE = "cvg_lv_vae_tiny.safetensors"
TEXT_DIM = 4096
W, H = 32, 32


@pytest.fixture(scope="module")
def files(comfy):
    save_file(tiny_dit_state("t2v", 1), str(comfy.models_dir / "diffusion_models" / T2V))
    save_file(tiny_dit_state("i2v", 2), str(comfy.models_dir / "diffusion_models" / I2V))
    from models.wan import vae_loading
    vae_loading.save_wan_vae(tiny_vae(), comfy.models_dir / "vae" / VAE)
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 9, TEXT_DIM, generator=g)
    neg = torch.randn(1, 4, TEXT_DIM, generator=g)
    save_file({"text_embeds": pos}, str(comfy.input_dir / "cvg_lv_pos.safetensors"))
    save_file({"text_embeds": neg}, str(comfy.input_dir / "cvg_lv_neg.safetensors"))
    return pos, neg


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for node in ("CVGLatentPerturber", "CVGExtendVideo", "CVGLongVideoSampler", "CVGKeyframes", "CVGInterpolator"):
        assert node in info, node
        assert info[node]["category"] == "CVG/long_video"
    assert not comfy.import_failures()
    assert list(info["CVGLatentPerturber"]["input"]["required"]) == ["latent", "level", "seed"]
    assert "z_s = (1 − s)·z + s·ε" in info["CVGLatentPerturber"]["description"]
    assert info["CVGLongVideoSampler"]["output"] == ["IMAGE", "STRING"]


def test_latent_perturber_formula(comfy):
    prompt = {
        "1": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 32, "height": 16, "length": 5, "batch_size": 1}},
        "2": {"class_type": "CVGLatentPerturber", "inputs": {"latent": ["1", 0], "level": 0.25, "seed": 11}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "cvg_lv_perturb"}},
    }
    out = comfy.run(prompt)
    entry = out["3"]["latents"][0]
    z = load_file(str(comfy.output_dir / entry.get("subfolder", "") / entry["filename"]))["latent_tensor"]
    zero = torch.zeros(1, 16, 2, 2, 4)
    eps = torch.randn(zero.shape, generator=torch.Generator().manual_seed(11))
    expect = wan_latent.denormalize(0.75 * wan_latent.normalize(zero) + 0.25 * eps)
    assert torch.allclose(z, expect, atol=1e-5)


def test_keyframes_from_images_every_nth(comfy):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 7, "color": 0}},
        "2": {"class_type": "CVGKeyframes", "inputs": {"mode": "from_images", "every_nth": 3, "width": 16,
                                                        "height": 16, "seed": 0, "steps": 1, "cfg": 1.0, "shift": 5.0,
                                                        "solver": "euler", "images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cvg_lv_kf"}},
    }
    out = comfy.run(prompt)
    assert len(out["3"]["images"]) == 3  # frames 0, 3, 6


def test_keyframes_prompts_need_a_model(comfy):
    prompt = {
        "2": {"class_type": "CVGKeyframes", "inputs": {"mode": "from_prompts", "every_nth": 1, "width": 16,
                                                        "height": 16, "seed": 0, "steps": 1, "cfg": 1.0, "shift": 5.0,
                                                        "solver": "euler"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cvg_lv_kf2"}},
    }
    err = comfy.run_expect_error(prompt)
    assert "from_prompts needs model, vae, positive" in err


# ------------------------------------------------------------------------------- sampling graphs

def loaders(model=T2V):
    return {
        "m": {"class_type": "CVGLoadWanModel", "inputs": {"model_name": model, "weight_dtype": "default",
                                                           "attention": "sdpa", "compute_dtype": "fp32"}},
        "v": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": VAE, "dtype": "fp32", "device": "cpu"}},
        "p": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_lv_pos.safetensors"}},
        "n": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_lv_neg.safetensors"}},
    }


SAMPLER = {"seed": 5, "steps": 2, "cfg": 4.0, "shift": 5.0, "solver": "unipc"}
LVDM = {"perturbation": 0.0, "frame_guidance": 0.0, "color_anchor": 0.0}


def long_node(num_segments=2, **kw):
    inputs = {"model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "width": W,
              "height": H, "num_segments": num_segments, **SAMPLER, "segment_length": 9, "overlap_frames": 5, **LVDM}
    inputs.update(kw)
    return {"class_type": "CVGLongVideoSampler", "inputs": inputs}


def save(images, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def saved_frames(comfy, outputs, node):
    import numpy as np
    from PIL import Image
    frames = []
    for e in outputs[node]["images"]:
        path = comfy.output_dir / e.get("subfolder", "") / e["filename"]
        frames.append(torch.from_numpy(np.array(Image.open(path)).astype("float32") / 255.0))
    return torch.stack(frames)


def quantised(x):
    return torch.clamp(x * 255.0, 0, 255).to(torch.uint8).float() / 255.0


@pytest.fixture(scope="module")
def inproc(comfy, files):
    from models.wan import loading, vae_loading
    t2v = loading.load_wan_dit(comfy.models_dir / "diffusion_models" / T2V, dtype=torch.float32)
    vae = vae_loading.load_wan_vae(comfy.models_dir / "vae" / VAE, dtype=torch.float32, device="cpu")
    return t2v, vae


def _decode(vae, z):
    with torch.no_grad():
        return ((vae.decode(z)[0].permute(1, 2, 3, 0) + 1) * 0.5).clamp(0, 1)


def _encode(vae, frames):
    with torch.no_grad():
        return vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1)


def test_long_video_t2v_matches_in_process(comfy, files, inproc):
    """Segment 0 = plain T2V (the DiT engineer's pipeline); segment 1 = substitution of the re-encoded last 5
    frames, rebuilt here from the model-level pieces."""
    from models.wan import pipeline
    pos, neg = files
    t2v, vae = inproc
    prompt = {**loaders(), "l": long_node(2), "s": save(["l", 0], "cvg_lv_long")}
    got = saved_frames(comfy, comfy.run(prompt), "s")
    assert got.shape == (9 + 4, H, W, 3)

    z0 = pipeline.sample_video(t2v, pos, neg, torch.zeros(1, 16, 3, H // 8, W // 8), seed=5, steps=2, cfg=4.0,
                               shift=5.0, solver="unipc")
    seg0 = _decode(vae, z0)
    tail = seg0[-5:]
    cond = wan_latent.normalize(_encode(vae, tail))
    full = torch.zeros(1, 16, 3, H // 8, W // 8)
    full[:, :, :2] = cond
    noise = sampling.seeded_noise((1, 16, 3, H // 8, W // 8), 5 + 1)
    sub = LV.FrameSubstitution(full, [0, 1], level=0.0, noise=noise)
    fn = LV.wan_velocity_fn(t2v, pos, neg, cfg_scale=4.0, substitution=sub)
    with torch.no_grad():
        x = sub.finalize(sampling.sample(fn, noise.clone(), sampling.wan_sigmas(2, 5.0), "unipc"))
    seg1 = _decode(vae, wan_latent.denormalize(x))
    expect = torch.cat([seg0, seg1[5:]])
    assert (got - quantised(expect)).abs().max() <= 1.0 / 255 + 1e-6
    assert got.std() > 0.01  # not a blank video


def test_extend_video_chains_and_keeps_input(comfy, files, inproc):
    prompt = {**loaders(), "l": long_node(1, seed=9),
              "e": {"class_type": "CVGExtendVideo", "inputs": {
                  "model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "images": ["l", 0],
                  **SAMPLER, "segment_length": 9, "overlap_frames": 1, "perturbation": 0.1, "frame_guidance": 0.5,
                  "color_anchor": 0.5}},
              "e2": {"class_type": "CVGExtendVideo", "inputs": {
                  "model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "images": ["e", 0],
                  **SAMPLER, "segment_length": 9, "overlap_frames": 5, **LVDM}},
              "s0": save(["l", 0], "cvg_lv_ext0"), "s": save(["e2", 0], "cvg_lv_ext")}
    out = comfy.run(prompt)
    first, ext = saved_frames(comfy, out, "s0"), saved_frames(comfy, out, "s")
    assert ext.shape[0] == 9 + 8 + 4
    assert torch.equal(ext[:9], first)


def test_extend_rejects_bad_overlap(comfy, files):
    prompt = {**loaders(), "l": long_node(1),
              "e": {"class_type": "CVGExtendVideo", "inputs": {
                  "model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "images": ["l", 0],
                  **SAMPLER, "segment_length": 9, "overlap_frames": 9, **LVDM}},
              "s": save(["e", 0], "cvg_lv_bad")}
    err = comfy.run_expect_error(prompt)
    assert "overlap 9 must be shorter than the segment length 9" in err


def _keyframe_pngs(comfy, n):
    from PIL import Image
    g = torch.Generator().manual_seed(21)
    names = []
    for j in range(n):
        px = (torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = f"cvg_lv_key{j}.png"
        Image.fromarray(px).save(comfy.input_dir / name)
        names.append(name)
    return names


@pytest.mark.parametrize("model,frames_between", [(T2V, 3), (I2V, 1)])
def test_interpolator_keeps_each_keyframe_once_in_place(comfy, files, model, frames_between):
    names = _keyframe_pngs(comfy, 3)
    prompt = {**loaders(model)}
    for j, name in enumerate(names):
        prompt[f"k{j}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    prompt["b1"] = {"class_type": "ImageBatch", "inputs": {"image1": ["k0", 0], "image2": ["k1", 0]}}
    prompt["b2"] = {"class_type": "ImageBatch", "inputs": {"image1": ["b1", 0], "image2": ["k2", 0]}}
    prompt["i"] = {"class_type": "CVGInterpolator", "inputs": {
        "model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "keyframes": ["b2", 0],
        "frames_between": frames_between, **SAMPLER, **LVDM, "keep_keyframes": True}}
    prompt["s"] = save(["i", 0], f"cvg_lv_interp{frames_between}")
    got = saved_frames(comfy, comfy.run(prompt), "s")
    step = frames_between + 1
    assert got.shape[0] == 2 * step + 1
    import numpy as np
    from PIL import Image
    for j, name in enumerate(names):
        key = torch.from_numpy(np.array(Image.open(comfy.input_dir / name)).astype("float32") / 255.0)
        assert torch.equal(got[j * step], key)
    # generated frames in between are not copies of the keyframes
    assert not torch.equal(got[1], got[0])


def test_story_keyframes_from_prompts(comfy, files):
    prompt = {**loaders(),
              "c": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["p", 0], "conditioning_2": ["n", 0]}},
              "k": {"class_type": "CVGKeyframes", "inputs": {"mode": "from_prompts", "every_nth": 1, "width": W,
                                                              "height": H, **SAMPLER, "model": ["m", 0], "vae": ["v", 0],
                                                              "positive": ["c", 0], "negative": ["n", 0]}},
              "i": {"class_type": "CVGInterpolator", "inputs": {
                  "model": ["m", 0], "vae": ["v", 0], "positive": ["p", 0], "negative": ["n", 0], "keyframes": ["k", 0],
                  "frames_between": 3, **SAMPLER, **LVDM, "keep_keyframes": True}},
              "sk": save(["k", 0], "cvg_lv_story_k"), "s": save(["i", 0], "cvg_lv_story")}
    out = comfy.run(prompt)
    keys, video = saved_frames(comfy, out, "sk"), saved_frames(comfy, out, "s")
    assert keys.shape[0] == 2 and video.shape[0] == 5
    assert torch.equal(video[0], keys[0]) and torch.equal(video[4], keys[1])
    assert not torch.equal(keys[0], keys[1])  # one frame per prompt, different prompts


# ------------------------------------------------------------------- the shipped workflows, run

WORKFLOWS = __import__("pathlib").Path(__file__).resolve().parents[2] / "workflows"


def _shrink_workflow(ui, info, clip_file=None):
    """The user's workflow with the tiny test files: umT5 text nodes become CVG Load Text Embeds (the test host
    predates ComfyUI's Wan text encoder), CLIP vision nodes are dropped (their inputs are optional), sizes,
    lengths and steps shrink. Everything else — node types, links, the other widgets — is the shipped file."""
    from host import workflows as wf
    drop = {n["id"] for n in ui["nodes"] if n["type"] in ("CLIPLoader", "CLIPVisionLoader", "CLIPVisionEncode")}
    links = [l for l in ui["links"] if l[1] not in drop and l[3] not in drop]
    keep_ids = {l[0] for l in links}
    nodes = []
    for n in ui["nodes"]:
        if n["id"] in drop:
            continue
        n = json.loads(json.dumps(n))
        n["inputs"] = [i for i in n.get("inputs", []) if i.get("link") in keep_ids]
        if n["type"] == "CLIPTextEncode":
            n["type"] = "CVGLoadTextEmbeds"
            neg = "negative" in n.get("title", "")
            n["widgets_values"] = ["cvg_lv_neg.safetensors" if neg else "cvg_lv_pos.safetensors"]
        if n["type"] in info:
            layout = [name for slot, name in wf.widget_layout(info[n["type"]])]
            vals = n["widgets_values"]

            def put(name, value):
                if name in layout:
                    vals[layout.index(name)] = value
            name = vals[0] if vals else ""
            if n["type"] == "CVGLoadWanModel":
                put("model_name", I2V if ("i2v" in name or "flf2v" in name) else T2V)
                put("compute_dtype", "fp32")
            if n["type"] == "CVGLoadVAE":
                put("vae_name", VAE), put("dtype", "fp32"), put("device", "cpu")
            if n["type"] == "CVGLoadVideo":
                put("video", clip_file), put("frame_cap", 3), put("max_side", 0), put("resize", "none")
            for k, v in (("width", W), ("height", H), ("steps", 1), ("segment_length", 9), ("num_segments", 2),
                         ("overlap_frames", 5), ("frames_between", 3)):
                put(k, v)
            if n["type"] == "CVGSaveVideo":
                put("format", "mkv-ffv1")
        nodes.append(n)
    # re-index input slots of kept links
    by_id = {n["id"]: n for n in nodes}
    new_links = []
    for l in links:
        dst = by_id[l[3]]
        names = [i["name"] for i in dst["inputs"]]
        old = next(i["name"] for i in dst["inputs"] if i.get("link") == l[0])
        new_links.append([l[0], l[1], l[2], l[3], names.index(old), l[5]])
    return {**ui, "nodes": nodes, "links": new_links}


def _run_workflow(comfy, name, clip_file=None):
    from host import workflows as wf
    info = comfy.object_info()
    ui = _shrink_workflow(wf.load(WORKFLOWS / name), info, clip_file)
    problems = wf.validate(ui, info)
    assert not problems, problems
    out = comfy.run(wf.to_api(ui, info))
    saves = [n["id"] for n in ui["nodes"] if n["type"] == "CVGSaveVideo"]
    assert len(saves) == 1
    return out[str(saves[0])]["cvg_video"][0]


def test_workflow_long_extend_runs(comfy, files):
    entry = _run_workflow(comfy, "long_extend.json")
    assert entry["frames"] == 9 + 4 + 4  # 2 segments of 9 with overlap 5, then one extension


def test_workflow_story_keyframes_runs(comfy, files):
    entry = _run_workflow(comfy, "long_story_keyframes.json")
    assert entry["frames"] == (3 - 1) * 4 + 1  # 3 prompts -> 3 keyframes, 3 frames between


def test_workflow_interpolate_x4_runs(comfy, files):
    from models import video_files as vf
    g = torch.Generator().manual_seed(4)
    clip = torch.rand(5, H, W, 3, generator=g)
    path = vf.write_video(str(comfy.input_dir / "cvg_lv_clip.mkv"), clip, format="mkv-ffv1", fps=8.0)
    entry = _run_workflow(comfy, "interpolate_x4.json", clip_file=__import__("os").path.basename(path))
    assert entry["frames"] == (3 - 1) * 4 + 1  # frame_cap 3 originals, x4


def test_prompt_list_outside_keyframes_is_a_clear_error(comfy, files):
    prompt = {**loaders(),
              "c": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["p", 0], "conditioning_2": ["n", 0]}},
              "l": long_node(1, positive=["c", 0]), "s": save(["l", 0], "cvg_lv_two_prompts")}
    err = comfy.run_expect_error(prompt)
    assert "holds 2 prompts" in err and "CVG Keyframes" in err


@pytest.mark.parametrize("model", [T2V, I2V])
def test_batched_passes_equal_separate_passes(comfy, files, model):
    lvdm = {"perturbation": 0.1, "frame_guidance": 0.5, "color_anchor": 0.0}
    prompt = {**loaders(model), "a": long_node(2, **lvdm), "b": long_node(2, **lvdm, batch_passes=True),
              "sa": save(["a", 0], "cvg_lv_sep"), "sb": save(["b", 0], "cvg_lv_bat")}
    out = comfy.run(prompt)
    a, b = saved_frames(comfy, out, "sa"), saved_frames(comfy, out, "sb")
    assert a.shape == b.shape == (13, H, W, 3)
    assert (a - b).abs().max() <= 1.0 / 255 + 1e-6
