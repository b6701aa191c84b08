"""bench/fp8_error.py measures the weight modes CVG Load Wan Model really produces: its in-memory copies hold the
same tensors, scales and matmul path as load_wan_dit of a file with the master's weights, and give the same
velocity."""
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.wan import loading
from models.wan.dit import FP8, WanConfig, scaled_mm_unsupported

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "fp8_error.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fp8_error", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scales(model):
    return {n: m.scale_weight for n, m in model.named_modules() if getattr(m, "scale_weight", None) is not None}


def _scaled_mm_layers(model):
    return {n for n, m in model.named_modules() if getattr(m, "runs_scaled_mm", False)}


# the loader's weight_dtype for each mode
LOADER_MODE = {"bf16": None, "fp8_e4m3fn": "fp8_e4m3fn", "e4m3 scaled, upcast": loading.SCALED_MM,
               loading.SCALED_MM: loading.SCALED_MM}


@pytest.mark.parametrize("mode", list(LOADER_MODE))
def test_weight_modes_equal_the_loader(tmp_path, mode):
    bench = _bench()
    if mode == loading.SCALED_MM and scaled_mm_unsupported("cpu"):
        pytest.skip(scaled_mm_unsupported("cpu"))
    cfg = WanConfig(model_type="t2v", dim=256, ffn_dim=64, heads=2, layers=2, in_dim=16, text_dim=32, freq_dim=16)
    master = bench.random_master(cfg, torch.float32, torch.device("cpu"), seed=3)
    save_file({k: v.contiguous() for k, v in master.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = loading.load_wan_dit(tmp_path / "w.safetensors", dtype=torch.bfloat16, weight_dtype=LOADER_MODE[mode])
    ours = bench.weight_mode(master, mode)

    mine, theirs = ours.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k].float(), theirs[k].float()), k
    assert _scales(ours).keys() == _scales(loaded).keys()
    assert all(torch.equal(s, _scales(loaded)[n]) for n, s in _scales(ours).items())
    assert (ours.blocks[0].ffn[0].weight.dtype == FP8) == (mode != "bf16")
    if mode == "e4m3 scaled, upcast":  # the same tensors as the scaled-mm load, every Linear on the upcast path
        for name in _scaled_mm_layers(loaded):
            loaded.get_submodule(name).scaled_mm = False
    assert _scaled_mm_layers(ours) == _scaled_mm_layers(loaded)
    assert bool(_scaled_mm_layers(ours)) == (mode == loading.SCALED_MM)

    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 1, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([700])
    with torch.inference_mode():
        assert torch.equal(ours(x, t, ctx), loaded(x, t, ctx))
