"""Wan DiT on several GPUs (models/wan/multi_device.py): forward, CFG step and full-sample times on 1, 2, 4, 8
GPUs, each layout checked against the 1-GPU velocity before its timing, and the scaling efficiency.

    python bench/bench_multigpu.py --model 1.3b --gpus 1,2,4,8          # T2V-1.3B, 480x832x81 (32,760 tokens)
    python bench/bench_multigpu.py --model 14b --gpus 1,2,4,8 --steps 5 # T2V-14B, 720x1280x81 (75,600 tokens)
    python bench/bench_multigpu.py --smoke                              # CPU, 2 gloo processes, tiny config

Layouts per GPU count N (models/wan/multi_device.py): "SP×N" all N GPUs sequence-parallel (the passes one after
the other; needs heads % N == 0) and "CFG×2·SP×N/2" (conditional and unconditional pass on two halves at once).
Every worker builds the same seeded random weights at the real size on its GPU (bf16); the driver (this process)
runs the UniPC loop on the CPU and sends the latent each step, as CVG Sampler does with CVG Multi-GPU.

Reported per layout: seconds of one forward (SP layouts: one pass) and of one CFG step (two passes), both as the
driver sees them and as the slowest worker measured them (the difference is the latent's round trip), the
full --steps-step CFG sample (UniPC, shift 5) and its 50-step equivalent, the peak GPU memory of the busiest
rank, and the efficiency T(1 GPU) / (N · T(N GPUs)). --baseline reads the 1-GPU figures of an earlier --json.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_dit import T2V_14B, T2V_1_3B, forward_flops  # noqa: E402
from models import sampling  # noqa: E402
from models.wan.dit import WanConfig  # noqa: E402
from models.wan.multi_device import DevicePool, check_layout  # noqa: E402

MODELS = {"1.3b": ("T2V-1.3B", T2V_1_3B, (81, 480, 832)), "14b": ("T2V-14B", T2V_14B, (81, 720, 1280))}
SMOKE = ("smoke", WanConfig(model_type="t2v", dim=64, ffn_dim=96, heads=4, layers=2, in_dim=16, text_dim=32,
                            text_len=16), (9, 48, 80))
SHIFT, CFG, SIGMA = 5.0, 5.0, 0.9


def layouts(heads, n):
    """(label, cfg_parallel) of every layout that `n` devices can run for a model with `heads` heads."""
    if n == 1:
        return [("1 device", False)]
    out = []
    for cfg_parallel in (False, True):
        try:
            check_layout(heads, n, cfg_parallel)
        except ValueError:
            continue
        label = (f"CFG×2·SP×{n // 2}" if n > 2 else "CFG×2") if cfg_parallel else f"SP×{n}"
        out.append((label, cfg_parallel))
    return out


def timed(fn, repeat):
    """Median wall seconds of fn() and the matching worker-side seconds (fn returns the pool's figure)."""
    walls, workers = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        workers.append(fn())
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), statistics.median(workers)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_layout(pool, label, cfg_parallel, inputs, args, base):
    x, ctx, neg = inputs
    row = {"layout": label, "devices": pool.devices}
    if not cfg_parallel:  # one pass over all devices: the forward figure
        one = pool.velocity_fn(ctx, None, 1.0)
        one(x, SIGMA)  # warm-up (torch.compile of the fused ops on CUDA)
        row["forward_s"], row["forward_worker_s"] = timed(lambda: (one(x, SIGMA), pool.worker_seconds)[1],
                                                          args.repeat)
    step = pool.velocity_fn(ctx, neg, CFG, cfg_parallel=cfg_parallel)
    v = step(x, SIGMA)
    if base is not None and "velocity" in base:
        row["velocity_rel_diff_vs_1"] = rel(v, base["velocity"])
        print(f"  check {label}: CFG velocity vs 1 device, relative L2 {row['velocity_rel_diff_vs_1']:.2e}")
    row["step_s"], row["step_worker_s"] = timed(lambda: (step(x, SIGMA), pool.worker_seconds)[1], args.repeat)
    if args.steps:
        sigmas = sampling.wan_sigmas(args.steps, SHIFT, "unipc")
        noise = sampling.seeded_noise(tuple(x.shape), 0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampling.sample(step, noise, sigmas, "unipc")
        row["sample_s"] = time.perf_counter() - t0
        row["sample_steps"] = args.steps
        row["sample_50_s"] = row["sample_s"] * 50 / args.steps
    peaks = pool.peak_memory_gib()
    row["peak_gib"] = max(peaks) if not all(math.isnan(p) for p in peaks) else float("nan")
    return row, v


def efficiency(row, base):
    for key in ("forward_s", "step_s", "sample_s"):
        if base is not None and key in base and key in row:
            row[key.replace("_s", "_efficiency")] = base[key] / (row["devices"] * row[key])


def print_row(row):
    def s(key, fmt="{:.3f} s"):
        return fmt.format(row[key]) if key in row else "—"

    sample = "—"
    if "sample_s" in row:
        sample = f"{row['sample_s']:.1f} s ({row['sample_steps']} steps)"
        if row["sample_steps"] != 50:
            sample += f" ≈ {row['sample_50_s']:.0f} s for 50"
    print(f"  {row['layout']:<14} forward {s('forward_s')} (workers {s('forward_worker_s')})  "
          f"CFG step {s('step_s')} (workers {s('step_worker_s')})  sample {sample}  "
          f"peak {row['peak_gib']:.2f} GiB  efficiency forward {s('forward_efficiency', '{:.0%}')}, "
          f"step {s('step_efficiency', '{:.0%}')}, sample {s('sample_efficiency', '{:.0%}')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 gloo CPU processes (checks the script)")
    ap.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    ap.add_argument("--gpus", default="1,2,4,8", help="comma-separated device counts (those above the machine's "
                                                        "GPU count are skipped, with a note)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50, help="steps of the measured CFG sample (0 skips it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--eager", action="store_true", help="no torch.compile of the elementwise groups")
    ap.add_argument("--baseline", default=None, help="--json of an earlier run holding the 1-GPU row")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.smoke:
        device_type, dtype, (name, cfg, size) = "cpu", torch.float32, SMOKE
        counts, available = [1, 2], 2
        args.steps, args.repeat = min(args.steps, 3), 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on the CPU")
        device_type, dtype, (name, cfg, size) = "cuda", torch.bfloat16, MODELS[args.model]
        counts, available = [int(n) for n in args.gpus.split(",") if n.strip()], torch.cuda.device_count()
    frames, height, width = args.frames or size[0], args.height or size[1], args.width or size[2]
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
    flops = forward_flops(cfg, tokens, 512)
    print(f"{name}: {frames}x{height}x{width} -> latent {lat}, {tokens} tokens, 512 text rows; "
          f"{flops / 1e12:.1f} TFLOP per forward; {cfg.heads} heads")
    if device_type == "cuda":
        print(f"devices: {available} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *lat, generator=g)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g) * 0.1
    neg = torch.randn(1, 512, cfg.text_dim, generator=g) * 0.1
    results = {"config": name, "tokens": tokens, "tflop_per_forward": flops / 1e12, "rows": []}
    base = None
    if args.baseline:
        with open(args.baseline) as f:
            base = next(r for r in json.load(f)["rows"] if r["devices"] == 1)
    failed = False
    for n in counts:
        if n > available:
            print(f"  {n} devices: skipped, this machine has {available}")
            continue
        todo = layouts(cfg.heads, n)
        if not todo:
            print(f"  {n} devices: no layout splits {cfg.heads} heads")
            continue
        t0 = time.perf_counter()
        with DevicePool(device_type, n) as pool:
            pool.load_random(cfg, seed=0, dtype=dtype, attention_backend=args.attention,
                             fused=False if args.eager else None)
            print(f"  {n} device(s): workers started and weights made in {time.perf_counter() - t0:.1f} s")
            for label, cfg_parallel in todo:
                row, v = run_layout(pool, label, cfg_parallel, (x, ctx, neg), args, base)
                if n == 1:
                    base = {**row, "velocity": v}
                efficiency(row, base if n != 1 else None)
                if "forward_s" in row:
                    row["forward_tflops_per_device"] = flops / row["forward_worker_s"] / n / 1e12
                print_row(row)
                results["rows"].append(row)
                # the check of the split arithmetic: bf16 rounding on GPUs, float32 rounding in the smoke run
                limit = 1e-5 if dtype == torch.float32 else 5e-2
                if row.get("velocity_rel_diff_vs_1", 0.0) > limit:
                    print(f"  CHECK FAILED: {label} differs from 1 device by more than {limit:g}")
                    failed = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
