"""Write workflows/demo_{t2v,i2v,long}.json (UI format) from their API-format graphs, laid out with the
live server's /object_info so the widget order is the nodes' own. Run after changing a demo node:

    python scripts/make_demo_workflows.py
"""
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host import workflows  # noqa: E402
from host.provision import comfyui_path  # noqa: E402
from host.server import ComfyServer  # noqa: E402

CAPTION = "a red circle moving right quickly on a black background"
NOTE = (
    "Demo world: runs on a CPU with the weights bundled in the pack (models/demo/weights) — nothing to "
    "download. The demo models are tiny and, in this release, undertrained (see docs/model_card.md): "
    "they draw a shape on the captioned background, but its colour, shape and motion often miss the "
    "caption (docs/quality.md); with seed 0 the T2V demo's circle moves right as captioned but is magenta, "
    "not red. Captions follow the grammar 'a <colour> <shape> <motion> <speed> on a <background> background'."
)


def model(name):
    return {"class_type": "CVGLoadWanModel", "inputs": {"model_name": name, "weight_dtype": "default",
                                                          "attention": "sdpa", "compute_dtype": "fp32"}}


def common(dit):
    return {
        "model": model(dit),
        "vae": {"class_type": "CVGLoadVAE", "inputs": {"vae_name": "cvg_demo_vae.safetensors", "dtype": "fp32",
                                                       "device": "auto"}},
        "pos": {"class_type": "CVGDemoTextEncode", "inputs": {"text": CAPTION}},
        "neg": {"class_type": "CVGDemoTextEncode", "inputs": {"text": ""}},
    }


def sampler(latent):
    return {"class_type": "CVGSampler", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                    "negative": ["neg", 0], "latent": [latent, 0], "seed": 0,
                                                    "steps": 20, "cfg": 4.0, "shift": 3.0, "solver": "unipc",
                                                    "denoise": 1.0}}


def to_file(samples, prefix):
    return {"class_type": "CVGDecodeToVideo", "inputs": {"samples": [samples, 0], "vae": ["vae", 0],
                                                          "filename_prefix": prefix, "format": "mp4", "fps": 8.0,
                                                          "crf": 19, "preset": "medium"}}


def graphs():
    t2v = common("cvg_demo_t2v.safetensors")
    t2v["latent"] = {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 64, "height": 64, "length": 17,
                                                                     "batch_size": 1}}
    t2v["sample"] = sampler("latent")
    t2v["save"] = to_file("sample", "CVG/demo_t2v")

    i2v = common("cvg_demo_i2v.safetensors")
    i2v["scene"] = {"class_type": "CVGDemoScene", "inputs": {"text": CAPTION, "length": 1, "size": 64, "seed": 0}}
    # The demo I2V model has no CLIP image branch to speak of: image strength 0.
    i2v["cond"] = {"class_type": "CVGI2VConditioner", "inputs": {"vae": ["vae", 0], "start_image": ["scene", 0],
                                                                  "width": 64, "height": 64, "length": 17,
                                                                  "image_strength": 0.0, "noise_augmentation": 0.0,
                                                                  "seed": 0}}
    i2v["sample"] = sampler("cond")
    i2v["save"] = to_file("sample", "CVG/demo_i2v")

    long = common("cvg_demo_i2v.safetensors")
    long["long"] = {"class_type": "CVGLongVideoSampler", "inputs": {
        "model": ["model", 0], "vae": ["vae", 0], "positive": ["pos", 0], "negative": ["neg", 0], "width": 64,
        "height": 64, "num_segments": 8, "seed": 0, "steps": 20, "cfg": 4.0, "shift": 3.0, "solver": "unipc",
        "segment_length": 17, "overlap_frames": 5, "perturbation": 0.0, "frame_guidance": 0.0,
        "color_anchor": 0.0}}
    long["save"] = {"class_type": "CVGSaveVideo", "inputs": {"images": ["long", 0], "filename_prefix": "CVG/demo_long",
                                                             "format": "mp4", "fps": 8.0, "crf": 19,
                                                             "preset": "medium"}}
    return {"demo_t2v": t2v, "demo_i2v": i2v, "demo_long": long}


def main():
    with tempfile.TemporaryDirectory() as work:
        server = ComfyServer(comfyui_path(), REPO, work).start()
        try:
            info = server.object_info()
        finally:
            server.stop()
    for name, graph in graphs().items():
        ui = workflows.from_api(graph, info, notes=[NOTE])
        problems = workflows.validate(ui, info)
        if problems:
            raise SystemExit(f"{name}: " + "\n".join(problems))
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        print(f"workflows/{name}.json")


if __name__ == "__main__":
    main()
