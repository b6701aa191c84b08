"""CVG Multi-GPU through a real ComfyUI server: CVG Sampler with 2 gloo CPU worker processes (sequence
parallel, and CFG parallel) gives the latent of the same graph without it; the workers are kept between
prompts or stopped, never re-run ComfyUI's main.py, and impossible layouts are clear errors.

Oracle: the same graph without the CVG Multi-GPU node, on the same server (one process, one forward at a time).
"""
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from host.random_weights import randomize_dit
from models.wan.dit import WanConfig, WanDiT

MODEL = "cvg_test_multi_gpu_t2v.safetensors"  # dim 256: the loader reads 2 heads of 128
ONE_HEAD = "cvg_test_multi_gpu_one_head.safetensors"


@pytest.fixture(scope="module")
def files(comfy):
    for name, dim, heads in ((MODEL, 256, 2), (ONE_HEAD, 128, 1)):
        m = randomize_dit(WanDiT(WanConfig(dim=dim, ffn_dim=64, heads=heads, layers=2)), 4)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(comfy.models_dir / "diffusion_models" / name))
    g = torch.Generator().manual_seed(8)
    save_file({"text_embeds": torch.randn(1, 9, 4096, generator=g)}, str(comfy.input_dir / "cvg_mg_pos.safetensors"))
    save_file({"text_embeds": torch.randn(1, 4, 4096, generator=g)}, str(comfy.input_dir / "cvg_mg_neg.safetensors"))


def graph(multi_gpu=None, model=MODEL, sampler_extra=None, prefix="cvg_multi_gpu"):
    g = {
        "1": {"class_type": "CVGLoadWanModel", "inputs": {"model_name": model, "weight_dtype": "default",
                                                           "attention": "sdpa", "compute_dtype": "fp32"}},
        "2": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_mg_pos.safetensors"}},
        "3": {"class_type": "CVGLoadTextEmbeds", "inputs": {"embeds": "cvg_mg_neg.safetensors"}},
        "4": {"class_type": "CVGEmptyVideoLatent", "inputs": {"width": 32, "height": 48, "length": 5, "batch_size": 1}},
        "5": {"class_type": "CVGSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                      "latent": ["4", 0], "seed": 5, "steps": 3, "cfg": 4.0,
                                                      "shift": 5.0, "solver": "unipc", "denoise": 1.0,
                                                      **(sampler_extra or {})}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    if multi_gpu is not None:
        g["7"] = {"class_type": "CVGMultiGPU", "inputs": multi_gpu}
        g["5"]["inputs"]["multi_gpu"] = ["7", 0]
    return g


def cpu_workers(devices=2, cfg_parallel=False, keep_workers=True):
    return {"device": "cpu", "devices": devices, "cfg_parallel": cfg_parallel, "keep_workers": keep_workers}


def saved_latent(comfy, outputs):
    entry = outputs["6"]["latents"][0]
    return load_file(str(comfy.output_dir / entry.get("subfolder", "") / entry["filename"]))["latent_tensor"]


def server_workers(comfy):
    children = psutil.Process(comfy.process.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_node_registered_and_sampler_inputs_kept(comfy):
    info = comfy.object_info()
    assert info["CVGMultiGPU"]["output"] == ["CVG_MULTI_GPU"]
    assert list(info["CVGMultiGPU"]["input"]["required"]) == ["device", "devices", "cfg_parallel"]
    sampler = info["CVGSampler"]["input"]
    assert list(sampler["required"]) == ["model", "positive", "negative", "latent", "seed", "steps", "cfg", "shift",
                                         "solver", "denoise"]
    assert list(sampler["optional"])[-1] == "multi_gpu"


def test_two_cpu_workers_give_the_single_process_latent(comfy, files):
    expected = saved_latent(comfy, comfy.run(graph(prefix="cvg_mg_one")))
    assert expected.shape == (1, 16, 2, 6, 4) and expected.abs().max() > 0.1
    for cfg_parallel in (False, True):
        got = saved_latent(comfy, comfy.run(graph(cpu_workers(cfg_parallel=cfg_parallel))))
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item(), cfg_parallel
    assert len(server_workers(comfy)) == 2  # one pool, kept between the prompts
    # the workers started clean: ComfyUI's main.py (which logs the VRAM line on import) ran once, in the server
    assert comfy.log().count("Total VRAM") == 1


def test_keep_workers_off_stops_them(comfy, files):
    comfy.run(graph(cpu_workers(cfg_parallel=True, keep_workers=False)))
    assert server_workers(comfy) == []


def test_impossible_settings_are_clear_errors(comfy, files):
    if torch.cuda.is_available():
        err = comfy.run_expect_error(graph({**cpu_workers(devices=torch.cuda.device_count() + 1), "device": "cuda"}))
        assert "were requested but this machine has" in err
    else:
        err = comfy.run_expect_error(graph({**cpu_workers(), "device": "cuda"}))
        assert "torch sees no CUDA device" in err and "use device 'cpu'" in err
    err = comfy.run_expect_error(graph(cpu_workers(devices=3, cfg_parallel=True)))
    assert "even device count" in err
    err = comfy.run_expect_error(graph(cpu_workers(), model=ONE_HEAD))
    assert "1 attention heads out over 2 devices" in err
    err = comfy.run_expect_error(graph(cpu_workers(), sampler_extra={"step_cache_threshold": 0.1}))
    assert "step cache is not available with CVG Multi-GPU" in err
    assert server_workers(comfy) == []  # every check came before a worker was started
