"""Sequence-parallel and CFG-parallel Wan forwards on 2 CPU processes (gloo) equal one process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.wan.dit import WanConfig, build_model
from models.wan.parallel import WORKER_ENV, SequenceParallel, cfg_parallel_velocity


def tiny_model(model_type="t2v", heads=4):
    torch.manual_seed(0)
    in_dim = 36 if model_type != "t2v" else 16
    cfg = WanConfig(model_type=model_type, dim=64, ffn_dim=96, heads=heads, layers=2, in_dim=in_dim, text_dim=32, text_len=16)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # every weight random, the zero-initialised head included
            p.copy_(torch.randn_like(p) * 0.2)
    return model.float().eval()


def inputs(model_type="t2v", frames=3, h=6, w=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, frames, h, w, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    neg = torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([731.0])
    extra = {}
    if model_type != "t2v":
        extra = {"y": torch.randn(1, 20, frames, h, w, generator=g), "clip_fea": torch.randn(1, 257, 1280, generator=g)}
    return x, t, ctx, neg, extra


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, model_type, mode, out_path):
    os.environ.update(WORKER_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model(model_type)
        x, t, ctx, neg, extra = inputs(model_type)
        with torch.no_grad():
            if mode == "sequence":
                v = model(x, t, ctx, sequence_parallel=SequenceParallel(), **extra)
            else:
                v = cfg_parallel_velocity(model(x, t, ctx if rank == 0 else neg, **extra), 5.0)
        if rank == 0:
            torch.save(v, out_path)
    finally:
        dist.destroy_process_group()


def run_parallel(tmp_path, model_type, mode, world=2):
    out = tmp_path / f"{model_type}_{mode}.pt"
    mp.spawn(_worker, args=(world, _free_port(), model_type, mode, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_sequence_parallel_forward_equals_one_process(tmp_path, model_type):
    model = tiny_model(model_type)
    x, t, ctx, _, extra = inputs(model_type)
    with torch.no_grad():
        expected = model(x, t, ctx, **extra)
    got = run_parallel(tmp_path, model_type, "sequence")
    # 3·3·5 = 45 tokens: shards of 23 and 22, so the uneven split is exercised too
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_cfg_parallel_equals_two_passes(tmp_path):
    model = tiny_model()
    x, t, ctx, neg, _ = inputs()
    with torch.no_grad():
        v_c, v_u = model(x, t, ctx), model(x, t, neg)
    got = run_parallel(tmp_path, "t2v", "cfg")
    assert (got - (v_u + 5.0 * (v_c - v_u))).abs().max().item() <= 1e-5


def test_heads_not_divisible_is_a_clear_error():
    class Fake(SequenceParallel):
        def __init__(self):
            self.world, self.rank, self.group = 5, 0, None

    with pytest.raises(ValueError, match="divisible"):
        Fake().check_heads(12)
    assert Fake().sizes(12) == [3, 3, 2, 2, 2]
