"""The worker pool of models/wan/multi_device.py with 2 gloo CPU processes: its velocities and full samples
equal one process (pipeline.make_velocity_fn / sample_video on the same model), sequence-parallel and
CFG-parallel; worker errors, deaths and interrupts end the pool with a clear error and leave no process."""
import psutil
import pytest
import torch
from safetensors.torch import save_file

from host.random_weights import randomize_dit
from models.wan import loading, multi_device, pipeline
from models.wan.dit import WanConfig, WanDiT
from models.wan.multi_device import DevicePool, MultiDeviceError

TOL = 1e-5


def tiny_model(model_type="t2v", seed=0, heads=4):
    in_dim = 16 if model_type == "t2v" else 36
    cfg = WanConfig(model_type=model_type, dim=64, ffn_dim=96, heads=heads, layers=2, in_dim=in_dim, text_dim=32,
                    text_len=16, image_dim=24)
    return randomize_dit(WanDiT(cfg), seed).eval().requires_grad_(False)


def texts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 7, 32, generator=g), torch.randn(1, 5, 32, generator=g)


def i2v_condition(frames=3, h=6, w=10):
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 20, frames, h, w, generator=g), torch.randn(1, 257, 24, generator=g)


LATENT = torch.zeros(1, 16, 3, 6, 10)  # 3·3·5 = 45 tokens: shards of 23 and 22 (the uneven split)


@pytest.fixture(scope="module")
def pool():
    p = DevicePool("cpu", 2)
    yield p
    p.close()


def worker_children():
    return [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]


def assert_gone(pool):
    assert pool.closed and not pool.alive
    assert all(p.exitcode is not None for p in pool.processes)
    left = {c.pid for c in worker_children()} & {p.pid for p in pool.processes}
    assert not left, f"worker processes left running: {left}"


@pytest.mark.parametrize("cfg_parallel", [False, True], ids=["sequence", "cfg"])
def test_velocity_equals_one_process(pool, cfg_parallel):
    model = tiny_model()
    ctx, neg = texts()
    x = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(3))
    expected = pipeline.make_velocity_fn(model, ctx, neg, 4.0)(x, 0.731)
    pool.load(model)
    got = pool.velocity_fn(ctx, neg, 4.0, cfg_parallel=cfg_parallel)(x, 0.731)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    assert expected.abs().max().item() > 0.1


@pytest.mark.parametrize("cfg_parallel", [False, True], ids=["sequence", "cfg"])
def test_sample_equals_one_process(pool, cfg_parallel):
    model = tiny_model()
    ctx, neg = texts()
    kw = dict(steps=4, cfg=4.0, shift=5.0, solver="unipc")
    expected = pipeline.sample_video(model, ctx, neg, LATENT, 7, **kw)
    got = multi_device.sample_video(pool, model, ctx, neg, LATENT, 7, cfg_parallel=cfg_parallel, **kw)
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()
    assert expected.abs().max().item() > 0.1


def test_i2v_batched_cfg_sample_equals_one_process(pool):
    """y and clip_fea reach the workers; batch_cfg runs the two passes as one sequence-parallel batch."""
    model = tiny_model("i2v", seed=5)
    ctx, neg = texts()
    y, clip = i2v_condition()
    kw = dict(steps=3, cfg=3.0, shift=3.0, solver="euler", y=y, clip_fea=clip, image_strength=0.7)
    expected = pipeline.sample_video(model, ctx, neg, LATENT, 2, **kw)
    got = multi_device.sample_video(pool, model, ctx, neg, LATENT, 2, batch_cfg=True, **kw)
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_weights_sent_once_and_replaced_with_the_model(pool, tmp_path, monkeypatch):
    ops = []
    real_call = pool._call
    monkeypatch.setattr(pool, "_call", lambda op, *a, **k: (ops.append(op), real_call(op, *a, **k))[1])
    first = tiny_model(seed=0)
    ctx, neg = texts()
    x = torch.randn(1, 16, 3, 6, 10)
    pool.load(first)
    pool.load(first)
    assert ops.count("load") <= 1  # 0 when the fixture's workers already hold it
    # a model from a file travels as its loader arguments, not its weights (dim 256: the loader reads 2 heads)
    path = tmp_path / "dit.safetensors"
    on_file = randomize_dit(WanDiT(WanConfig(dim=256, ffn_dim=96, heads=2, layers=1, text_dim=32)), 9)
    save_file({k: v.contiguous() for k, v in on_file.state_dict().items()}, str(path))
    second = loading.load_wan_dit(path, dtype=torch.float32)
    spec = multi_device.model_spec(second)
    assert spec["kind"] == "file" and "state" not in spec
    ops.clear()
    pool.load(second)
    assert ops == ["load"]
    got = pool.velocity_fn(ctx, neg, 4.0)(x, 0.5)
    expected = pipeline.make_velocity_fn(second, ctx, neg, 4.0)(x, 0.5)
    old = pipeline.make_velocity_fn(first, ctx, neg, 4.0)(x, 0.5)
    assert (got - expected).abs().max().item() <= TOL
    assert (got - old).abs().max().item() > 0.1


def test_layout_checked_before_anything_is_sent(pool):
    pool.load(tiny_model())
    ctx, neg = texts()
    with pytest.raises(ValueError, match="turn one of them off"):
        pool.velocity_fn(ctx, neg, 4.0, cfg_parallel=True, batch_cfg=True)
    with pytest.raises(ValueError, match="width 32"):
        pool.velocity_fn(torch.randn(1, 4, 768), neg, 4.0)
    assert pool.alive


def test_a_velocity_fn_of_an_earlier_job_is_refused(pool):
    pool.load(tiny_model())
    ctx, neg = texts()
    old = pool.velocity_fn(ctx, neg, 4.0)
    pool.velocity_fn(neg, ctx, 2.0)
    with pytest.raises(RuntimeError, match="earlier velocity_fn"):
        old(torch.randn(1, 16, 3, 6, 10), 0.5)
    assert pool.alive


def test_clear_errors_for_impossible_layouts(monkeypatch):
    with pytest.raises(ValueError, match=r"device counts that work: 2, 3, 4, 6, 12 \(cfg_parallel off\), 2, 4, 6, 8"):
        multi_device.check_layout(12, 8)
    multi_device.check_layout(12, 8, cfg_parallel=True)  # two halves of 4: 12 heads split 4 ways
    with pytest.raises(ValueError, match="even device count"):
        multi_device.check_layout(40, 3, cfg_parallel=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA device.*use device 'cpu'"):
        DevicePool("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 cuda devices were requested but this machine has 2.*devices <= 2"):
        multi_device.check_devices("cuda", 4)
    with pytest.raises(ValueError, match="device must be one of cuda, cpu"):
        multi_device.check_devices("tpu", 2)


def test_worker_error_reaches_the_caller_and_ends_the_pool():
    p = DevicePool("cpu", 2)
    try:
        p.load(tiny_model())
        ctx, neg = texts()
        fn = p.velocity_fn(ctx, neg, 4.0)
        with pytest.raises(MultiDeviceError, match=r"worker rank \d \(cpu rank \d\) failed while running a forward: "
                                                   r"ValueError: this Wan t2v model takes 16 input channels but got 17"):
            fn(torch.randn(1, 17, 3, 6, 10), 0.5)
        assert_gone(p)
        with pytest.raises(MultiDeviceError, match="shut down"):
            fn(torch.randn(1, 16, 3, 6, 10), 0.5)
    finally:
        p.close()


def test_interrupt_stops_the_call_and_keeps_the_workers(pool):
    class Interrupted(Exception):
        pass

    def should_stop():
        raise Interrupted()

    model = tiny_model(seed=3)
    pool.load(model)
    ctx, neg = texts()
    x = torch.randn(1, 16, 3, 6, 10)
    with pytest.raises(Interrupted):
        pool.velocity_fn(ctx, neg, 4.0, should_stop=should_stop)(x, 0.5)
    assert pool.alive  # the next prompt reuses the loaded workers
    got = pool.velocity_fn(ctx, neg, 4.0)(x, 0.25)
    assert (got - pipeline.make_velocity_fn(model, ctx, neg, 4.0)(x, 0.25)).abs().max().item() <= TOL


def test_an_interrupted_call_that_does_not_finish_ends_the_pool(monkeypatch):
    """After an interrupt the call in flight gets STOP_GRACE_S seconds (here none), then the workers are killed."""
    class Interrupted(Exception):
        pass

    def should_stop():
        raise Interrupted()

    monkeypatch.setattr(multi_device, "STOP_GRACE_S", -1.0)
    p = DevicePool("cpu", 1)
    try:
        p.load(tiny_model())
        with pytest.raises(Interrupted):
            p.velocity_fn(*texts(), 4.0, should_stop=should_stop)(torch.randn(1, 16, 3, 6, 10), 0.5)
        assert_gone(p)
    finally:
        p.close()


def test_a_killed_worker_is_named(pool):
    """Last in the file: it ends the module's pool."""
    pool.processes[1].kill()
    pool.processes[1].join()
    with pytest.raises(MultiDeviceError, match=r"worker rank 1 \(cpu rank 1\) was killed by SIGKILL"):
        pool.load(tiny_model(seed=42))
    assert_gone(pool)
