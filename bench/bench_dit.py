"""Wan DiT speed: this pack's WanDiT vs diffusers' WanTransformer3DModel (and ComfyUI's native WanModel when a
ComfyUI tree is given), same random weights, bf16, one forward at the real size, plus a full CFG sample.

    python bench/bench_dit.py                       # T2V-1.3B, 480x832x81 (32,760 tokens, 512 text rows)
    python bench/bench_dit.py --i2v14b              # I2V-14B forward at the same size (257 image tokens)
    python bench/bench_dit.py --comfyui /path/ComfyUI   # also ComfyUI's native WanModel
    python bench/bench_dit.py --smoke               # tiny config on the CPU (checks the script runs)
    python bench/bench_dit.py --steps 0 --no-fused-qkv   # self-attention q, k, v as three matmuls (fused: default)
    python bench/bench_dit.py --variants all --comfyui /path/ComfyUI
        # every fast-path variant of our forward (VARIANTS below: WanDiT switches) and the peers, all resident,
        # each checked against our plain eager path, then timed round-robin (--repeat rounds, order rotated),
        # with each one's per-round ratio to each peer; forwards only. --variant NAME runs the cvg rows of
        # the other modes with that variant's switches.

Fast paths (each one's output is checked against the plain path, and the check printed, before its timing):

    python bench/bench_dit.py --steps 50 --step-cache 0.05,0.1,0.2 --batch-cfg --e2e-diffusers
        # end-to-end 50-step CFG sample: plain, batched CFG, first-block step cache at each threshold
        # (full forwards counted, max/mean |Δ| of the latent vs plain) and diffusers' transformer in the same loop
    python bench/bench_dit.py --steps 0 --fp8       # fp8 e4m3 block Linears via torch._scaled_mm: velocity
        # max/mean error against bf16 printed, then the forward timed
    python bench/bench_dit.py --t2v14b --steps 0 --no-diffusers --blocks-to-swap 0,10,20,40
        # T2V-14B forward with N blocks kept on the CPU (side-stream prefetch): peak GPU memory and time

Peers (diffusers, and ComfyUI's WanModel with --comfyui) are built from our weights and run one at a time
with ours moved to the CPU, so each peak is that implementation's own; each peer's output is compared with ours
(relative L2, loud MISMATCH line beyond the tolerance) before it is timed, as is our fast path with its plain
eager path. `--steps 0` skips the full sample (the forward rows only, e.g. for the peer comparison).

Reports, per implementation: median seconds of a forward, TFLOP/s (analytic FLOPs of the forward), the ratio
to the bf16 matmul rate measured in the same run, peak memory; and the time of a full `--steps`-step CFG
sample (two forwards per step) with this pack's pipeline. `--json out.json` writes the figures.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.wan import loading, pipeline  # noqa: E402
from models import sampling  # noqa: E402
from models.wan.block_swap import BlockSwap  # noqa: E402
from models.wan import dit  # noqa: E402
from models.wan.dit import WanConfig, build_model, quantize_fp8_  # noqa: E402
from models.wan.step_cache import StepCache  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_peer  # noqa: E402

T2V_1_3B = WanConfig(model_type="t2v", dim=1536, ffn_dim=8960, heads=12, layers=30, in_dim=16)
T2V_14B = WanConfig(model_type="t2v", dim=5120, ffn_dim=13824, heads=40, layers=40, in_dim=16)
I2V_14B = WanConfig(model_type="i2v", dim=5120, ffn_dim=13824, heads=40, layers=40, in_dim=36)
SMOKE = WanConfig(model_type="t2v", dim=128, ffn_dim=96, heads=1, layers=2, in_dim=16, text_dim=64)
SMOKE_I2V = WanConfig(model_type="i2v", dim=128, ffn_dim=96, heads=1, layers=2, in_dim=36, text_dim=64)
# relative L2 of a peer's forward against ours: fp32 on the CPU is exact up to summation order; bf16 differs
# by the rounding of two kernel orders (1.4e-2 against diffusers in the 2026-12-01 run)
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# WanDiT's fast-path switches and the variants --variants times side by side (each on top of the defaults;
# "plain" is the eager reference every other one is checked against; "compute" = the compute dtype)
SWITCHES = ("fused", "fused_qkv", "fuse_residual", "gelu_epilogue", "compile_blocks", "residual_dtype",
            "contiguous_residual")
VARIANTS = {
    "plain": (dict(fused=False, fused_qkv=False, gelu_epilogue=False),
              "eager ops, three q/k/v matmuls, separate GELU (the reference path)"),
    "fast": ({}, "the defaults: compiled elementwise groups, fused QKV, GELU in the FFN matmul's epilogue, "
                 "token-major float32 residual"),
    "nogelu": (dict(gelu_epilogue=False), "fast with a separate GELU kernel (the defaults timed on 2026-12-01 "
                                          "third run's 'fast' row)"),
    "old": (dict(contiguous_residual=False, fuse_residual=False, gelu_epilogue=False),
            "the fast path as timed on 2026-12-01: residual in the patchify layout, ATen's last residual update"),
    "qkv3": (dict(fused_qkv=False), "fast with three q/k/v matmuls"),
    "block": (dict(compile_blocks=True), "every block body as one torch.compile graph (fused QKV)"),
    "block-qkv3": (dict(compile_blocks=True, fused_qkv=False), "block with three q/k/v matmuls"),
    "bf16res": (dict(residual_dtype="compute"),
                "fast with the residual stream in bf16 (ComfyUI's and diffusers' choice; not the reference)"),
}


def switches_of(model):
    return {k: getattr(model, k) for k in SWITCHES}


def set_switches(model, switches, dtype):
    for k, v in switches.items():
        setattr(model, k, dtype if v == "compute" else v)


def variant_switches(name, defaults):
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return {**defaults, **VARIANTS[name][0]}


def round_robin(fns, device, rounds):
    """Seconds of each fn per round, every fn once a round, the order rotated each round (clock drift and
    position effects spread over all of them)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def activation_peak(fn, device):
    """GiB allocated above what was resident before one call (all models stay on the device in --variants)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def forward_flops(cfg, tokens, text=512, image=0):
    """Multiply-add FLOPs (2 per MAC) of one forward, blocks + embeddings + head."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = (
        4 * 2 * tokens * d * d          # self-attn q, k, v, o
        + 2 * 2 * tokens * tokens * d   # QK^T and AV
        + 2 * 2 * tokens * d * d        # cross-attn q, o
        + 2 * 2 * text * d * d          # cross-attn k, v of the text
        + 2 * 2 * tokens * text * d     # cross attention
        + 2 * 2 * tokens * d * f        # FFN
    )
    if image:
        per_block += 2 * 2 * image * d * d + 2 * 2 * tokens * image * d
    embed = 2 * tokens * d * cfg.in_dim * 4 + 2 * text * (cfg.text_dim * d + d * d) + 2 * tokens * d * 4 * cfg.out_dim
    return cfg.layers * per_block + embed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=1, repeat=5):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device, dtype, n=8192):
    if device.type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / s


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def random_model(cfg, device, dtype, seed=0):
    """Our WanDiT at full size with random weights, built on meta and materialised once on the device."""
    model = build_model(cfg, "meta").to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "modulation" in name else (1.0 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.02)
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
    model.compute_dtype = dtype
    return model.eval().requires_grad_(False)


def diffusers_model(ours, cfg, device, dtype):
    import diffusers

    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**loading.diffusers_config(cfg))
    ref = ref.to(dtype).to_empty(device=device)
    missing = ref.load_state_dict(loading.original_to_diffusers(ours.state_dict()), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"diffusers key mismatch: {missing}")
    # diffusers keeps some modules in float32 when loaded with from_pretrained(torch_dtype=...); mirror that.
    keep = set(getattr(ref, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if keep & set(n.split(".")):
                p.data = p.data.float()
    # the RoPE tables are non-persistent buffers: to_empty left them uninitialised
    ref.rope = type(ref.rope)(cfg.head_dim, cfg.patch_size, 1024).to(device)
    return ref.eval().requires_grad_(False)


def diffusers_peer(ours, cfg, device, dtype, x, t, ctx, clip, y):
    """(diffusers model, its forward fn) with our weights, or (None, None) when diffusers is unavailable."""
    try:
        ref = diffusers_model(ours, cfg, device, dtype)
    except Exception as e:  # not installed, or an environment where it does not import
        print(f"  diffusers  skipped: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
        return None, None
    xin = torch.cat([x, y], 1).to(dtype) if y is not None else x.to(dtype)
    return ref, lambda: ref(xin, t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]


def comfyui_peer(path, ours, cfg, device, dtype, x, t, ctx, clip, y):
    """The forward fn of ComfyUI's native WanModel (from the tree at `path`) with our weights, or None."""
    try:
        comfy = comfy_peer.import_comfy(path, device)
        print(f"  {comfy_peer.describe(comfy)}")
        cm = comfy_peer.wan_dit(comfy, ours, cfg, device, dtype)
    except Exception as e:  # a tree with another WanModel signature, or a dependency missing
        print(f"  comfyui    skipped: {type(e).__name__}: {e}")
        return None
    return lambda: comfy_peer.dit_forward(cm, x, t, ctx, clip, y, dtype)


def build_peers(args, ours, cfg, device, dtype, *inputs):
    """{label: forward fn} of diffusers and ComfyUI native (unless skipped), on the device next to ours."""
    peers = {}
    if not args.no_diffusers:
        peers["diffusers"] = diffusers_peer(ours, cfg, device, dtype, *inputs)[1]
    if args.comfyui:
        peers["comfyui"] = comfyui_peer(args.comfyui, ours, cfg, device, dtype, *inputs)
    return {k: v for k, v in peers.items() if v is not None}


def run_variants(args, ours, cfg, names, defaults, inputs, device, dtype, flops, rate, results, parity):
    """Every named variant of our forward and the peers, all resident on the device: each checked against
    the plain path (first call, with its compile time), then timed round-robin for `--repeat` rounds."""
    x, t, ctx, clip, y = inputs
    for name in names:
        variant_switches(name, defaults)  # unknown names fail before any work
    set_switches(ours, variant_switches("plain", defaults), dtype)
    reference = ours(x, t, ctx, clip_fea=clip, y=y).float()
    fns, checks, first = {}, {}, {}

    def variant_fn(name):
        switches = variant_switches(name, defaults)

        def run():
            set_switches(ours, switches, dtype)
            return ours(x, t, ctx, clip_fea=clip, y=y)
        return run

    for name in names:
        fns[name] = variant_fn(name)
        t0 = time.perf_counter()
        out = fns[name]()
        sync(device)
        first[name] = time.perf_counter() - t0
        print(f"  {name:<11} {VARIANTS[name][1]}; first call {first[name]:.1f} s")
        checks[name] = parity(name, out, reference, dtype, "cvg plain eager path")
    for label, fn in build_peers(args, ours, cfg, device, dtype, x, t, ctx, clip, y).items():
        fns[label] = fn
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first[label] = time.perf_counter() - t0
        checks[label] = parity(label, out, reference, dtype, "cvg plain eager path")
    del reference, out
    round_robin(fns, device, 1)  # warm-up round
    times = round_robin(fns, device, args.repeat)
    peers = [p for p in ("comfyui", "diffusers") if p in fns]
    results["variants"] = {}
    print(f"  {args.repeat} rounds round-robin: median forward, TFLOP/s, share of the matmul rate, per-round ratio "
          f"to each peer (median), activation peak above the resident weights, relative L2 vs plain")
    for label, ts in times.items():
        s_ = statistics.median(ts)
        ratios = {p: statistics.median(a / b for a, b in zip(ts, times[p])) for p in peers}
        peak = activation_peak(fns[label], device)
        results["variants"][label] = {
            "forward_s": s_, "min_s": min(ts), "tflops": flops / s_ / 1e12, "ratio_to_matmul": flops / s_ / rate,
            "activation_peak_gib": peak, "rel_l2_vs_plain": checks[label], "first_call_s": first[label],
            **{f"vs_{p}": r for p, r in ratios.items()},
            "switches": variant_switches(label, defaults) if label in VARIANTS else None}
        vs = "  ".join(f"{r:.3f}x {p}" for p, r in ratios.items())
        print(f"  {label:<11} {s_:.3f} s (min {min(ts):.3f})  {flops / s_ / 1e12:6.1f} TFLOP/s  "
              f"{flops / s_ / rate:5.1%}  {vs}  act {peak:.2f} GiB  rel L2 {checks[label]:.2e}")
    set_switches(ours, defaults, dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    ap.add_argument("--i2v14b", action="store_true", help="I2V-14B forward instead of T2V-1.3B")
    ap.add_argument("--t2v14b", action="store_true", help="T2V-14B forward instead of T2V-1.3B")
    ap.add_argument("--fp8", action="store_true", help="also time fp8 e4m3 block Linears via torch._scaled_mm")
    ap.add_argument("--step-cache", default="", help="comma-separated step-cache thresholds for the full sample")
    ap.add_argument("--batch-cfg", action="store_true", help="also time the full sample with batched CFG")
    ap.add_argument("--e2e-diffusers", action="store_true",
                    help="also time diffusers' transformer in the same CFG sampling loop")
    ap.add_argument("--blocks-to-swap", default="", help="comma-separated block-swap counts, e.g. 0,10,20,40")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--steps", type=int, default=50, help="steps of the full CFG sample (0 skips it)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--comfyui", default=None, help="path of a ComfyUI tree to also time its native WanModel")
    ap.add_argument("--json", default=None)
    ap.add_argument("--eager", action="store_true", help="no torch.compile of the elementwise groups")
    ap.add_argument("--no-fused-qkv", action="store_true", help="self-attention q, k, v as three matmuls, not one")
    ap.add_argument("--variant", default="fast", help=f"WanDiT switches of the cvg rows: {', '.join(VARIANTS)}")
    ap.add_argument("--variants", default="",
                    help="comma-separated variants (or 'all') timed round-robin with the peers, forwards only")
    ap.add_argument("--profile", action="store_true",
                    help="print the top CUDA kernels of one forward, the kernel count and the GPU's idle share")
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = SMOKE_I2V if args.i2v14b else SMOKE
        if args.t2v14b:
            cfg = WanConfig(**{**SMOKE.to_dict(), "layers": 4})
        frames, height, width = 5, 32, 48
        args.steps = min(args.steps, 2)
        args.repeat = 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = I2V_14B if args.i2v14b else (T2V_14B if args.t2v14b else T2V_1_3B)
        frames, height, width = args.frames, args.height, args.width
    torch.backends.cuda.matmul.allow_tf32 = True
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
    image = 257 if cfg.has_image else 0
    flops = forward_flops(cfg, tokens, 512, image)
    rate = matmul_rate(device, dtype)
    name = ("I2V-14B" if args.i2v14b else "T2V-14B" if args.t2v14b else "T2V-1.3B") + (" (smoke)" if args.smoke else "")
    print(f"{name}: {frames}x{height}x{width} -> latent {lat}, {tokens} tokens, 512 text rows"
          f"{', 257 image tokens' if image else ''}; {flops / 1e12:.1f} TFLOP per forward")
    print(f"{dtype} matmul rate: {rate / 1e12:.1f} TFLOP/s -> FLOP limit {flops / rate:.3f} s")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *lat, generator=g).to(device)
    ctx = (torch.randn(1, 512, cfg.text_dim, generator=g) * 0.1).to(device, dtype)
    y = torch.randn(1, 20, *lat, generator=g).to(device) if cfg.has_image else None
    clip = torch.randn(1, 257, cfg.image_dim, generator=g).to(device, dtype) if cfg.has_image else None
    t = torch.tensor([999], device=device)
    results = {"config": name, "tokens": tokens, "tflop_per_forward": flops / 1e12,
               "matmul_tflops": rate / 1e12, "flop_limit_s": flops / rate, "impl": {}}

    def report(label, seconds, peak):
        tf = flops / seconds
        results["impl"][label] = {"forward_s": seconds, "tflops": tf / 1e12, "ratio_to_matmul": tf / rate,
                                  "peak_gib": peak}
        print(f"  {label:<10} forward {seconds:.3f} s  {tf / 1e12:7.1f} TFLOP/s  {tf / rate:5.1%} of matmul  "
              f"peak {peak:.2f} GiB")

    def parity(label, out, reference, dtype, against="cvg, same weights and inputs"):
        """Relative L2 of an output against ours, printed loudly when beyond the dtype's tolerance."""
        out = out.float()
        rel = ((out - reference).norm() / reference.norm()).item()
        tol = PARITY_TOL[dtype]
        verdict = "ok" if rel <= tol else f"!!! MISMATCH: beyond {tol:.0e}, its timing is not comparable !!!"
        print(f"  check {label} vs {against}: max |Δ| {(out - reference).abs().max().item():.3e}, "
              f"relative L2 {rel:.2e} (tolerance {tol:.0e}) {verdict}")
        return rel

    def time_peer(label, fn):
        """Median forward time; the peak counts only the timed forwards (and their warm-up)."""
        peak_reset(device)
        report(label, timed(fn, device, repeat=args.repeat), peak_gib(device))

    ours = random_model(cfg, device, dtype)
    ours.attention_backend = args.attention
    defaults = switches_of(ours)
    if args.smoke:  # the compiled paths traced without code generation on the CPU
        dit.compile_backend = "aot_eager"
    if args.variants:
        names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
        with torch.inference_mode():
            run_variants(args, ours, cfg, names, defaults, (x, t, ctx, clip, y), device, dtype, flops, rate, results,
                         parity)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
        return results
    set_switches(ours, variant_switches(args.variant, defaults), dtype)
    if args.eager:
        ours.fused = False
    ours.fused_qkv = not args.no_fused_qkv
    with torch.inference_mode():
        peak_reset(device)
        t0 = time.perf_counter()
        out = ours(x, t, ctx, clip_fea=clip, y=y)
        sync(device)
        print(f"  cvg first forward (includes torch.compile of the fused ops): {time.perf_counter() - t0:.1f} s")
        if ours.fused_qkv:
            ours.fused_qkv = False
            three = ours(x, t, ctx, clip_fea=clip, y=y)
            ours.fused_qkv = True
            print(f"  check fused QKV vs three q/k/v matmuls: max |Δ| {(out - three).abs().max().item():.3e}, "
                  f"relative L2 {((out - three).norm() / three.norm()).item():.2e}")
            del three
        fast, plain_switches = switches_of(ours), variant_switches("plain", defaults)
        if device.type == "cuda" and fast != plain_switches:
            set_switches(ours, plain_switches, dtype)
            plain = ours(x, t, ctx, clip_fea=clip, y=y)
            set_switches(ours, fast, dtype)
            results["rel_diff_fast_vs_plain"] = parity(f"cvg fast path ({args.variant}: {VARIANTS[args.variant][1]})",
                                                       out, plain.float(), dtype, "its plain eager path")
            del plain
        del out
        time_peer("cvg", lambda: ours(x, t, ctx, clip_fea=clip, y=y))
        if args.profile and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ours(x, t, ctx, clip_fea=clip, y=y)
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
            # the GPU's idle time between its first and last kernel bounds what CUDA graphs could save
            gpu = [e.time_range for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            if gpu:
                busy = sum(r.elapsed_us() for r in gpu) / 1e6
                span = (max(r.end for r in gpu) - min(r.start for r in gpu)) / 1e6
                print(f"  {len(gpu)} GPU kernels and copies in one forward: busy {busy:.4f} s of a {span:.4f} s span "
                      f"(idle {1 - busy / span:.2%}, with the profiler's own overhead)")
        # Peers run one at a time with ours on the CPU, so each peak is that implementation's own weights +
        # activations (+ the few MB of shared inputs and our reference output), and each output is checked
        # against ours before it is timed.
        reference = ours(x, t, ctx, clip_fea=clip, y=y).float()
        ours.to("cpu")
        peak_reset(device)
        ref = None
        if not args.no_diffusers:
            ref, run_ref = diffusers_peer(ours, cfg, device, dtype, x, t, ctx, clip, y)
        if ref is not None:
            results["rel_diff_vs_diffusers"] = parity("diffusers", run_ref(), reference, dtype)
            time_peer("diffusers", run_ref)
            if args.e2e_diffusers and args.steps and not cfg.has_image:
                ref.to("cpu")  # back on the device for its own sampling loop, with ours on the CPU
            else:
                del ref
                ref = None
            peak_reset(device)
        run_cm = comfyui_peer(args.comfyui, ours, cfg, device, dtype, x, t, ctx, clip, y) if args.comfyui else None
        if run_cm is not None:
            results["rel_diff_vs_comfyui"] = parity("comfyui", run_cm(), reference, dtype)
            time_peer("comfyui", run_cm)
            del run_cm
            peak_reset(device)
        del reference
        ours.to(device)
        if args.steps and not cfg.has_image:
            neg = (torch.randn(1, 512, cfg.text_dim, generator=g) * 0.1).to(device, dtype)
            z0 = torch.zeros(1, 16, *lat, device=device)
            skw = dict(seed=0, steps=args.steps, cfg=5.0, shift=5.0, solver="unipc")

            def run_sample(**kw):
                peak_reset(device)
                t0 = time.perf_counter()
                out = pipeline.sample_video(ours, ctx, neg, z0, **skw, **kw)
                sync(device)
                return out, time.perf_counter() - t0, peak_gib(device)

            plain, sample_s, peak = run_sample()
            results["sample_s"] = sample_s
            results["sample_steps"] = args.steps
            results["e2e"] = {"plain": {"s": sample_s, "forwards": 2 * args.steps, "peak_gib": peak}}
            print(f"  full {args.steps}-step CFG sample (unipc, {2 * args.steps} forwards): {sample_s:.1f} s, "
                  f"peak {peak:.2f} GiB")

            def check(label, out):
                d = (out - plain).abs()
                psnr = 10 * torch.log10((plain.max() - plain.min()) ** 2 / (d ** 2).mean().clamp_min(1e-20)).item()
                print(f"  check {label}: latent vs plain max |Δ| {d.max().item():.3e}, mean {d.mean().item():.3e}, "
                      f"PSNR {psnr:.1f} dB")
                return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "psnr_db": psnr}

            if args.batch_cfg:
                out, s_, peak = run_sample(batch_cfg=True)
                c = check("batch_cfg", out)
                results["e2e"]["batch_cfg"] = {"s": s_, "forwards": 2 * args.steps, "peak_gib": peak, **c}
                print(f"  full sample, batched CFG ({args.steps} batch-2 forwards): {s_:.1f} s, peak {peak:.2f} GiB")
            for th in [float(v) for v in args.step_cache.split(",") if v.strip()]:
                cache = StepCache(th)
                out, s_, peak = run_sample(step_cache=cache)
                c = check(f"step cache {th}", out)
                results["e2e"][f"step_cache_{th}"] = {"s": s_, "forwards": cache.full, "peak_gib": peak, **c}
                print(f"  full sample, step cache {th}: {s_:.1f} s, {cache.full} of {cache.calls} forwards ran every "
                      f"block, peak {peak:.2f} GiB")
            if args.e2e_diffusers and ref is not None:
                x0n = sampling.seeded_noise((1, 16, *lat), 0).to(device)
                sig = sampling.wan_sigmas(args.steps, 5.0, "unipc")

                def v_ref(xs, sigma):
                    tt = torch.full((1,), sampling.timestep(sigma), device=device, dtype=torch.int64)
                    xb = xs.to(dtype)
                    vc = ref(xb, tt, ctx, return_dict=False)[0].float()
                    vu = ref(xb, tt, neg, return_dict=False)[0].float()
                    return sampling.cfg(vc, vu, 5.0)
                ours.to("cpu")
                ref.to(device)
                peak_reset(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = sampling.sample(v_ref, x0n, sig, "unipc")
                sync(device)
                s_ = time.perf_counter() - t0
                from models.wan import latent as wan_latent
                c = check("diffusers loop (same inputs, bf16 drift expected)", wan_latent.denormalize(out))
                results["e2e"]["diffusers"] = {"s": s_, "forwards": 2 * args.steps, "peak_gib": peak_gib(device), **c}
                print(f"  full sample, diffusers WanTransformer3DModel in the same UniPC CFG loop: {s_:.1f} s, "
                      f"peak {peak_gib(device):.2f} GiB")
                ours.to(device)
        if ref is not None:
            del ref
            peak_reset(device)
        swaps = [int(v) for v in args.blocks_to_swap.split(",") if v.strip()]
        if swaps:
            results["block_swap"] = {}
            base = ours(x, t, ctx, clip_fea=clip, y=y)
            for n in swaps:
                n = min(n, cfg.layers)
                swap = BlockSwap(ours, n)
                sync(device)
                peak_reset(device)
                out = ours(x, t, ctx, clip_fea=clip, y=y)
                d = (out - base).abs().max().item()
                print(f"  check blocks_to_swap {n}: max |Δ| vs all blocks resident {d:.3e}")
                peak_reset(device)
                s_ = timed(lambda: ours(x, t, ctx, clip_fea=clip, y=y), device, warmup=0, repeat=args.repeat)
                peak = peak_gib(device)
                results["block_swap"][n] = {"forward_s": s_, "peak_gib": peak, "max_abs_vs_resident": d}
                print(f"  blocks_to_swap {n:>2}: forward {s_:.3f} s, peak {peak:.2f} GiB "
                      f"({swap.swapped_bytes() / 2**30:.1f} GiB of weights on the CPU)")
                swap.remove()
                ours.to(device)
        if args.fp8:
            base = ours(x, t, ctx, clip_fea=clip, y=y)
            try:
                quantize_fp8_(ours)
                out = ours(x, t, ctx, clip_fea=clip, y=y)
            except (RuntimeError, NotImplementedError) as e:
                print(f"  fp8        skipped: torch._scaled_mm unavailable here ({type(e).__name__}: {e})")
            else:
                d = (out - base).abs()
                rel = ((out - base).norm() / base.norm()).item()
                results["fp8_error_vs_bf16"] = {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "rel_l2": rel}
                print(f"  check fp8 velocity vs {str(dtype).replace('torch.', '')}: max |Δ| {d.max().item():.3e}, mean |Δ| {d.mean().item():.3e}, "
                      f"relative L2 {rel:.2e} (|v| mean {base.abs().mean().item():.3f})")
                peak_reset(device)
                s_ = timed(lambda: ours(x, t, ctx, clip_fea=clip, y=y), device, repeat=args.repeat)
                report("cvg-fp8", s_, peak_gib(device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
