"""Several devices on one Wan sample: a pool of worker processes, one per device, each holding the model,
runs the DiT forwards sequence-parallel and/or CFG-parallel (models/wan/parallel.py); the caller's process
keeps the sampling loop and sends each step's latent out.

    pool = DevicePool("cuda", 4)          # or DevicePool("cpu", 2): gloo processes (tests, CI)
    pool.load(model)                      # once per model; the workers keep it
    z = sample_video(pool, model, text, negative, latent, seed, steps=50, cfg=5.0, cfg_parallel=True)
    pool.close()

Layout of the N ranks: with cfg_parallel, ranks [0, N/2) run the conditional pass and [N/2, N) the
unconditional one, each half sequence-parallel over its N/2 ranks, and ranks 0 and N/2 combine the two
velocities; without it all N ranks are sequence-parallel and run the passes one after the other.

Messages are plain pickles over pipes (no shared memory, so a small /dev/shm does not matter): the model once
per pool and model (its file recipe when it came from `loading.load_wan_dit`, else its state), the
conditioning once per sample, then per step only the latent out and the velocity back. A worker that fails
or dies shuts the whole pool down and the caller gets a MultiDeviceError naming the rank and the cause.
"""
import atexit
import contextlib
import math
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import types
import weakref
from multiprocessing import connection as mp_connection
from pathlib import Path

import torch
import torch.multiprocessing as mp

from . import pipeline
from .parallel import WORKER_ENV, SequenceParallel, cfg_parallel_velocity

DEVICE_TYPES = ("cuda", "cpu")
PACK_ROOT = str(Path(__file__).resolve().parents[2])
STOP_GRACE_S = 120.0  # after an interrupt, how long the call in flight may take before the workers are killed

# A worker imports this file as `models.wan.multi_device` with the pack root first on its path, so it loads
# nothing of the caller's (ComfyUI's) packages; the environment is set before torch is imported.
_BOOT = """
import os, sys
os.environ.update(env)
sys.path.insert(0, root)
from models.wan.multi_device import worker_main
worker_main(**kwargs)
"""


class MultiDeviceError(RuntimeError):
    """A worker failed or exited; the pool has been shut down."""


def check_devices(device_type, devices):
    """Raise a clear error when `devices` workers of `device_type` cannot be started on this machine."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_TYPES)}, not {device_type!r}")
    if int(devices) < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"this torch build ({torch.__version__}) has no torch.distributed, which the worker "
                         "processes need; install an official PyTorch build")
    if device_type == "cpu":
        return
    if not torch.cuda.is_available():
        build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"{devices} 'cuda' devices were requested but torch sees no CUDA device (torch {torch.__version__}, "
            f"{build}); use device 'cpu' (gloo processes, for testing) or run on NVIDIA GPUs with a CUDA build "
            "of torch")
    found = torch.cuda.device_count()
    if devices > found:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"{devices} cuda devices were requested but this machine has {found}{note}; "
                         f"use devices <= {found}")
    if not dist.is_nccl_available():
        raise ValueError(f"this torch build ({torch.__version__}) has no NCCL backend for CUDA workers; install "
                         "an official CUDA build of PyTorch, or use device 'cpu'")


def check_halves(devices, cfg_parallel):
    if cfg_parallel and devices % 2:
        raise ValueError(f"cfg_parallel runs the conditional and unconditional passes on two halves of the "
                         f"devices, so it needs an even device count (got {devices}); use {devices + 1} devices "
                         "or turn cfg_parallel off")


def check_layout(heads, devices, cfg_parallel=False, batch_cfg=False):
    """Raise a clear error when `devices` ranks cannot split a model with `heads` attention heads."""
    if cfg_parallel and batch_cfg:
        raise ValueError("cfg_parallel and batch_cfg both place the conditional and unconditional passes; "
                         "turn one of them off")
    check_halves(devices, cfg_parallel)
    sp = devices // 2 if cfg_parallel else devices
    if sp > 1 and heads % sp:
        plain = ", ".join(str(n) for n in range(2, 17) if heads % n == 0)
        halves = ", ".join(str(2 * n) for n in range(1, 9) if heads % n == 0)
        raise ValueError(
            f"sequence parallel shares the model's {heads} attention heads out over {sp} devices, but {heads} is "
            f"not divisible by {sp}; device counts that work: {plain or 'none'} (cfg_parallel off), {halves} "
            "(cfg_parallel on)")


# ------------------------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def _bare_main():
    """spawn re-runs the parent's main script in every child (in ComfyUI: main.py's prestartup scripts, the
    server's imports and a CUDA context on device 0 per worker); a bare __main__ while start() runs keeps the
    workers clean."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_reason(code):
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class DevicePool:
    """`devices` worker processes on `device_type` ('cuda': one GPU each, NCCL; 'cpu': gloo)."""

    def __init__(self, device_type="cuda", devices=2, threads=None):
        check_devices(device_type, devices)
        self.device_type, self.devices = device_type, int(devices)
        if threads is None and device_type == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.devices)
        self.threads = threads
        self.processes, self._conns = [], []  # the processes stay listed after close (their exit codes)
        self.closed = False
        self._model = None  # weakref to the model the workers hold
        self._job = 0  # the workers hold one job (conditioning); a velocity fn of an earlier one is refused
        self.config = None
        self.worker_seconds = None  # the slowest rank's time of the last call, measured in the workers
        self._start()

    def device_name(self, rank):
        return f"cuda:{rank}" if self.device_type == "cuda" else f"cpu rank {rank}"

    @property
    def alive(self):
        return not self.closed and all(p.is_alive() for p in self.processes)

    def _start(self):
        ctx = mp.get_context("spawn")
        port = _free_port()
        backend = "nccl" if self.device_type == "cuda" else "gloo"
        try:
            for rank in range(self.devices):
                ours, theirs = ctx.Pipe()
                kwargs = dict(rank=rank, world=self.devices, backend=backend, port=port, conn=theirs,
                              device=f"cuda:{rank}" if self.device_type == "cuda" else "cpu", threads=self.threads)
                proc = ctx.Process(target=exec, args=(_BOOT, {"env": dict(WORKER_ENV), "root": PACK_ROOT,
                                                              "kwargs": kwargs}),
                                   name=f"cvg-wan-worker-{rank}", daemon=True)
                with _bare_main():
                    proc.start()
                theirs.close()  # our copy of the worker's end: without it a dead worker would never read as EOF
                self.processes.append(proc)
                self._conns.append(ours)
            self._collect("starting")
        except BaseException:
            self.close(force=True)
            raise

    def close(self, force=False):
        """Stop the workers (politely unless `force`), then make sure none is left."""
        if self.closed:
            return
        if not force:
            for conn, proc in zip(self._conns, self.processes):
                if proc.is_alive():
                    with contextlib.suppress(OSError):
                        conn.send_bytes(pickle.dumps(("stop", None)))
            for proc in self.processes:
                proc.join(timeout=10)
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._model, self.closed = [], None, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- calls ------------------------------------------------------------------------------------
    def _fail(self, message):
        self.close(force=True)
        raise MultiDeviceError(message)

    def _collect(self, what, should_stop=None):
        """Every rank's reply (and what should_stop() raised, if it did); a worker's error or exit ends the pool."""
        replies, seconds = [None] * self.devices, [0.0] * self.devices
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        stopped, give_up = None, None
        while pending:
            if should_stop is not None and stopped is None:
                try:
                    should_stop()
                except Exception as e:  # finish the call in flight, so the workers keep the model, then raise
                    stopped, give_up = e, time.monotonic() + STOP_GRACE_S
            if give_up is not None and time.monotonic() > give_up:
                self.close(force=True)
                raise stopped
            for conn in mp_connection.wait(list(pending), timeout=0.1):
                rank = pending.pop(conn)
                try:
                    status, payload, seconds[rank] = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self.processes[rank].join(timeout=5)
                    self._fail(f"worker rank {rank} ({self.device_name(rank)}) "
                               f"{_exit_reason(self.processes[rank].exitcode)} while {what}; the pool was shut down")
                if status == "error":
                    self._fail(f"worker rank {rank} ({self.device_name(rank)}) failed while {what}: {payload}")
                replies[rank] = payload
        self.worker_seconds = max(seconds)
        return replies, stopped

    def _call(self, op, payload, what, should_stop=None):
        if self.closed:
            raise MultiDeviceError(f"the worker pool ({self.devices} × {self.device_type}) is shut down; start a new "
                                   "one")
        for rank, proc in enumerate(self.processes):
            if not proc.is_alive():
                self._fail(f"worker rank {rank} ({self.device_name(rank)}) {_exit_reason(proc.exitcode)} before "
                           f"{what}; the pool was shut down")
        try:
            data = pickle.dumps((op, payload), protocol=pickle.HIGHEST_PROTOCOL)
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(data)
                except OSError:
                    self.processes[rank].join(timeout=5)
                    self._fail(f"worker rank {rank} ({self.device_name(rank)}) "
                               f"{_exit_reason(self.processes[rank].exitcode)} before {what}; the pool was shut down")
            replies, stopped = self._collect(what, should_stop)
        except MultiDeviceError:
            raise
        except BaseException:  # e.g. Ctrl-C mid-call: the workers' state is unknown
            self.close(force=True)
            raise
        if stopped is not None:
            raise stopped
        return replies

    def load(self, model):
        """Give the workers `model` (a WanDiT); nothing is sent when they already hold this model object."""
        if self._model is not None and self._model() is model:
            return
        self._load(model_spec(model), model.config)
        self._model = weakref.ref(model)

    def load_random(self, config, seed=0, dtype=torch.bfloat16, attention_backend="sdpa", fused=None):
        """Every worker builds the same random-weights model on its device (benchmarks at the real size)."""
        self._load({"kind": "random", "config": config.to_dict(), "seed": int(seed), "dtype": dtype,
                    "attention_backend": attention_backend, "fused": fused}, config)
        self._model = None

    def peak_memory_gib(self):
        """Every rank's peak allocated device memory since its start (NaN on CPU ranks)."""
        return self._call("memory", None, "reading the memory statistics")

    def _load(self, spec, config):
        prints = self._call("load", spec, "loading the model")
        if not all(math.isclose(p, prints[0], rel_tol=1e-9) for p in prints):
            self._fail(f"the workers hold different weights after loading (sums of squares {prints}); the pool "
                       "was shut down")
        self.config = config

    def velocity_fn(self, context, negative_context=None, cfg=5.0, y=None, clip_fea=None, image_strength=1.0,
                    t_offset=0, batch_cfg=False, cfg_parallel=False, should_stop=None):
        """fn(x, σ) -> v like pipeline.make_velocity_fn, computed by the workers on the model of `load`.
        should_stop() is called while waiting and may raise an Exception (e.g. ComfyUI's interrupt): the call in
        flight is finished, so the workers keep their model, then it is raised to the caller."""
        if self.config is None:
            raise RuntimeError("DevicePool.velocity_fn before load(): give the workers a model first")
        check_layout(self.config.heads, self.devices, cfg_parallel, batch_cfg)
        text_dim = self.config.text_dim
        context = pipeline.text_tensor(context, text_dim, "positive conditioning")
        if negative_context is not None:
            negative_context = pipeline.text_tensor(negative_context, text_dim, "negative conditioning")
        if float(cfg) != 1.0 and negative_context is None:
            raise ValueError("cfg != 1 needs a negative conditioning (or set cfg to 1)")

        def cpu(t):
            return None if t is None else t.detach().cpu()

        job = dict(context=cpu(context), negative=cpu(negative_context), cfg=float(cfg), y=cpu(y),
                   clip_fea=cpu(clip_fea), image_strength=float(image_strength), t_offset=int(t_offset),
                   batch_cfg=bool(batch_cfg), cfg_parallel=bool(cfg_parallel))
        self._call("job", job, "preparing the conditioning")
        self._job += 1
        job_id = self._job

        def fn(x, sigma):
            if job_id != self._job:
                raise RuntimeError("this velocity function belongs to an earlier velocity_fn() call of the pool, "
                                   "whose workers now hold the newer conditioning; call velocity_fn() again")
            v = self._call("velocity", {"x": x.detach().cpu(), "sigma": float(sigma)}, "running a forward",
                           should_stop)[0]
            return v.to(x.device)

        return fn


def model_spec(model):
    """What a worker needs to rebuild `model`: the file and loader arguments when it came from
    loading.load_wan_dit with its storage unchanged since, else its weights (pickled once)."""
    extra = dict(fused=model.fused, fused_qkv=model.fused_qkv, compute_dtype=model.compute_dtype,
                 sinusoid_dtype=model.sinusoid_dtype)
    source = getattr(model, "source", None)
    if source is not None and _storage(model) == model.load_info.get("storage"):
        return {"kind": "file", **source, **extra}
    scales, scaled_mm = {}, []
    for name, module in model.named_modules():
        if getattr(module, "scale_weight", None) is not None:
            scales[name] = module.scale_weight.detach().cpu()
        if getattr(module, "scaled_mm", False):
            scaled_mm.append(name)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": "state", "config": model.config.to_dict(), "state": state, "scales": scales,
            "scaled_mm": scaled_mm, "attention_backend": model.attention_backend, **extra}


def _storage(model):
    return sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})


def sample_video(pool, model, context, negative_context, latent_raw, seed, steps=50, cfg=5.0, shift=5.0,
                 solver="unipc", denoise=1.0, y=None, clip_fea=None, image_strength=1.0, callback=None, t_offset=0,
                 batch_cfg=False, cfg_parallel=False, should_stop=None):
    """pipeline.sample_video with the forwards on the pool's workers (same arguments, same result up to float
    rounding). `model` is the caller's copy: loaded into the workers once, used here for its config."""
    pool.load(model)
    fn = pool.velocity_fn(context, negative_context, cfg, y=y, clip_fea=clip_fea, image_strength=image_strength,
                          t_offset=t_offset, batch_cfg=batch_cfg, cfg_parallel=cfg_parallel, should_stop=should_stop)
    return pipeline.sample_video(model, context, negative_context, latent_raw, seed, steps=steps, cfg=cfg,
                                 shift=shift, solver=solver, denoise=denoise, y=y, clip_fea=clip_fea,
                                 image_strength=image_strength, callback=callback, t_offset=t_offset, velocity_fn=fn)


# One pool per process for the nodes: kept between prompts, replaced when the settings change.
_SHARED = None


def shared_pool(device_type, devices):
    global _SHARED
    if _SHARED is not None and (_SHARED.device_type, _SHARED.devices) == (device_type, int(devices)) and _SHARED.alive:
        return _SHARED
    close_shared_pool()
    _SHARED = DevicePool(device_type, devices)
    return _SHARED


def close_shared_pool():
    global _SHARED
    if _SHARED is not None:
        _SHARED.close()
        _SHARED = None


atexit.register(close_shared_pool)


# ------------------------------------------------------------------------------------------------ workers


def worker_main(rank, world, backend, device, port, conn, threads=None):
    """One rank: join the process group, then answer the driver's messages until 'stop' or the driver is gone."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the driver decides
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    started = False
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        started = True
        worker = _Worker(rank, world, device)
    except BaseException:
        _reply(conn, "error", _describe(), 0.0)
        if started:
            dist.destroy_process_group()
        return
    _reply(conn, "ok", str(device), 0.0)
    try:
        worker.serve(conn)
    finally:
        dist.destroy_process_group()


def _reply(conn, status, payload, seconds):
    with contextlib.suppress(OSError):
        conn.send_bytes(pickle.dumps((status, payload, seconds), protocol=pickle.HIGHEST_PROTOCOL))


def _describe():
    kind, error, _ = sys.exc_info()
    return f"{kind.__name__}: {error}\n--- worker traceback ---\n{traceback.format_exc()}"


class _Sharded:
    """The model called with a SequenceParallel attached (None: the whole sequence on this rank)."""

    def __init__(self, model, sp):
        self.model, self.sp, self.config = model, sp, model.config

    def __call__(self, x, t, context, **kw):
        return self.model(x, t, context, sequence_parallel=self.sp, **kw)


class _Worker:
    def __init__(self, rank, world, device):
        import torch.distributed as dist

        self.rank, self.world, self.device = rank, world, device
        self.model = self.fn = None
        self.sp_all = SequenceParallel() if world > 1 else None
        self.half = self.sp_half = self.pair = None
        if world % 2 == 0:  # the CFG-parallel layout; every rank creates every group, in the same order
            h = world // 2
            halves = [dist.new_group(list(range(h))), dist.new_group(list(range(h, world)))]
            self.pair = dist.new_group([0, h])
            self.half = rank // h
            self.sp_half = SequenceParallel(halves[self.half]) if h > 1 else None

    def serve(self, conn):
        while True:
            try:
                op, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the driver is gone
                return
            if op == "stop":
                return
            t0 = time.perf_counter()
            try:
                # loading fills parameters in place, which inference mode forbids
                with torch.no_grad() if op == "load" else torch.inference_mode():
                    result = getattr(self, "op_" + op)(payload)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            except BaseException:
                _reply(conn, "error", _describe(), time.perf_counter() - t0)
                return  # the other ranks may be stuck in a collective: the driver ends the pool
            _reply(conn, "ok", result, time.perf_counter() - t0)

    def op_load(self, spec):
        self.model = self.fn = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.model = build_from_spec(spec, self.device)
        return sum(p.detach().double().square().sum().item() for p in self.model.parameters())

    def op_job(self, job):
        def dev(t):
            return None if t is None else t.to(self.device)

        kw = dict(y=dev(job["y"]), clip_fea=dev(job["clip_fea"]), image_strength=job["image_strength"],
                  t_offset=job["t_offset"])
        context, negative, cfg = dev(job["context"]), dev(job["negative"]), job["cfg"]
        if not job["cfg_parallel"]:
            self.fn = pipeline.make_velocity_fn(_Sharded(self.model, self.sp_all), context, negative, cfg,
                                                batch_cfg=job["batch_cfg"], **kw)
            return None
        if self.half is None:
            raise ValueError(f"cfg_parallel needs an even number of workers, this pool has {self.world}")
        one_pass = pipeline.make_velocity_fn(_Sharded(self.model, self.sp_half),
                                             context if self.half == 0 else negative, None, 1.0, **kw)
        use_cfg = cfg != 1.0

        def fn(x, sigma):
            if not use_cfg:  # nothing for the unconditional half to do
                return one_pass(x, sigma) if self.half == 0 else None
            v = one_pass(x, sigma)
            if self.rank in (0, self.world // 2):  # the first rank of each half holds its full velocity
                v = cfg_parallel_velocity(v, cfg, group=self.pair)
            return v

        self.fn = fn
        return None

    def op_memory(self, _):
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")

    def op_velocity(self, payload):
        v = self.fn(payload["x"].to(self.device), payload["sigma"])
        return v.float().cpu() if self.rank == 0 else None


def build_from_spec(spec, device):
    """A WanDiT on `device` from a model_spec / load_random description."""
    from . import loading
    from .dit import WanConfig, build_model

    kind = spec["kind"]
    if kind == "file":
        model = loading.load_wan_dit(spec["path"], device=device, dtype=spec["dtype"],
                                     weight_dtype=spec["weight_dtype"], attention_backend=spec["attention_backend"])
    elif kind == "state":
        numel = sum(v.numel() for v in spec["state"].values())
        # meta: no second copy of a big model; but its first use imports for seconds, longer than a small build
        model = build_model(WanConfig(**spec["config"]), "meta" if numel > 2**27 else device,
                            spec["attention_backend"])
        model.load_state_dict({k: v.to(device) for k, v in spec["state"].items()}, strict=True, assign=True)
        for name, scale in spec["scales"].items():
            model.get_submodule(name).register_buffer("scale_weight", scale.to(device), persistent=False)
        for name in spec["scaled_mm"]:
            model.get_submodule(name).scaled_mm = True
    elif kind == "random":
        model = random_model(WanConfig(**spec["config"]), spec["seed"], device, spec["dtype"],
                             spec["attention_backend"])
    else:
        raise ValueError(f"unknown model description {kind!r}")
    for key in ("fused", "fused_qkv", "compute_dtype", "sinusoid_dtype"):
        if key in spec:
            setattr(model, key, spec[key])
    return model.eval().requires_grad_(False)


def random_model(config, seed, device, dtype=torch.bfloat16, attention_backend="sdpa"):
    """A WanDiT with seeded random weights made on `device`: the same seed gives the same weights on every rank
    (the driver compares the ranks' sums of squares). Matmul weights ~ N(0, 1/fan-in), modulations N(0, 0.25),
    norm gains 1, the rest N(0, 0.02²)."""
    from .dit import build_model

    model = build_model(config, "meta", attention_backend).to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
            continue
        std = 0.5 if "modulation" in name else (1.0 / math.sqrt(math.prod(p.shape[1:])) if p.ndim >= 2 else 0.02)
        p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
    model.compute_dtype = dtype
    return model
