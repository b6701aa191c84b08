"""Quality cost of the fp8 (e4m3) weight modes at the real model size: velocity error against float32 and bf16.

    python bench/fp8_error.py                        # T2V-1.3B on the CPU, t = 999, 500, 50 (17 min on 2 shared cores)
    python bench/fp8_error.py --device cuda --model 14b   # T2V-14B (bf16 master weights: 28 GB + 14 GB fp8)
    python bench/fp8_error.py --smoke                # tiny config (checks the script runs)

The weights are the real size (every parameter of the released config, seeded, random at a realistic scale,
including the head the reference zero-initialises); the latent is small (--latent, default 1x16x1x16x32 =
128 tokens) because on the CPU the weights, not the tokens, are what must be real: the text context is the
full 512 x 4096. For each timestep the velocity is computed in float32 (the oracle) and with the weights
CVG Load Wan Model holds in each mode (same rules as models/wan/loading.py, tested against it):

    bf16                     every tensor bf16, bf16 compute (residual stream, norms, modulation in float32)
    fp8_e4m3fn               block Linear weights cast to e4m3 without a scale, upcast to bf16 per layer
    e4m3 scaled, upcast      block Linear weights e4m3 with a per-tensor scale (amax/448), upcast to bf16
    fp8_e4m3fn_scaled_mm     the same weights, activations quantized per tensor, torch._scaled_mm (fp8 x fp8)

and max |Δ|, mean |Δ| and relative L2 are reported against float32 and against bf16 (issue 10's figure).
Seeded and deterministic; `--json out.json` writes the figures. Seconds are wall clock, not a benchmark.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.wan import loading  # noqa: E402
from models.wan.dit import FP8, Linear, WanConfig, build_model, e4m3_weight, scaled_mm_unsupported  # noqa: E402

CONFIGS = {
    "1.3b": WanConfig(model_type="t2v", dim=1536, ffn_dim=8960, heads=12, layers=30, in_dim=16),
    "14b": WanConfig(model_type="t2v", dim=5120, ffn_dim=13824, heads=40, layers=40, in_dim=16),
}
SMOKE = WanConfig(model_type="t2v", dim=128, ffn_dim=96, heads=1, layers=2, in_dim=16, text_dim=64)
MODES = ("bf16", "fp8_e4m3fn", "e4m3 scaled, upcast", loading.SCALED_MM)
# Wan-AI ships T2V-1.3B in float32; the 14B is used as ComfyUI's bf16 file (its float32 master is 57 GB)
MASTER_DTYPE = {"1.3b": torch.float32, "14b": torch.bfloat16, "smoke": torch.float32}


def random_master(cfg, dtype, device, seed=0):
    """The model at full size with seeded random weights in `dtype` (drawn in float32 on the CPU, so the
    same on every device): Linear / conv weights N(0, 1/fan-in), biases N(0, 0.02²), norm gains 1 + N(0, 0.1²),
    modulation tables (blocks and head) N(0, 0.5²), the head included (the reference zero-initialises it)."""
    model = build_model(cfg, "meta")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        r = torch.randn(p.shape, generator=g)
        if "modulation" in name:
            r = r * 0.5
        elif p.ndim >= 2:
            r = r / math.sqrt(math.prod(p.shape[1:]))
        elif "norm" in name and name.endswith(".weight"):
            r = 1.0 + 0.1 * r
        else:
            r = r * 0.02
        state[name] = r.to(device, dtype)
        del r
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def weight_mode(master, mode, dtype=torch.bfloat16):
    """A WanDiT holding what load_wan_dit(dtype=bf16, weight_dtype=mode) makes of a file with master's tensors.
    "bf16" is weight_dtype None on a non-fp8 file; "e4m3 scaled, upcast" is what a scaled-fp8 file of these
    quantized weights loads as. Tensors whose dtype does not change are shared with master, not copied."""
    model = build_model(master.config, "meta")
    state, scales = {}, {}
    for name, t in master.state_dict().items():
        if mode == "bf16" or not loading._low_precision_ok(name, t.ndim):
            state[name] = t.to(dtype)
        elif mode == "fp8_e4m3fn":
            state[name] = t.to(FP8)
        else:
            state[name], scales[name[: -len(".weight")]] = e4m3_weight(t)
    model.load_state_dict(state, strict=True, assign=True)
    for base, scale in scales.items():
        module = model.get_submodule(base)
        module.register_buffer("scale_weight", scale, persistent=False)
        module.scaled_mm = mode == loading.SCALED_MM
    model.compute_dtype = dtype
    return model.eval().requires_grad_(False)


def weight_error(master, model):
    """Relative L2 (over all block Linear weights together) of the real weights a mode holds."""
    num = den = 0.0
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name.startswith("blocks."):
            w = master.get_submodule(name).weight.float()
            num += (m.dense_weight(torch.float32) - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return math.sqrt(num / den)


def compare(out, ref):
    d = (out - ref).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "rel_l2": ((out - ref).norm() / ref.norm()).item()}


def check_memory(cfg, master_dtype, device):
    """Exit with what is needed and what is free when the master weights + one fp8 copy cannot fit."""
    params = sum(v.numel() for v in build_model(cfg, "meta").state_dict().values())
    need = params * (master_dtype.itemsize + 1.2) / 2**30  # master + e4m3 blocks (+ bf16 rest): ~1.2 B/param
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 2**30
    else:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) / 2**20
    if need > 0.9 * free:
        sys.exit(f"{params / 1e9:.1f} B parameters need ~{need:.0f} GiB ({str(master_dtype)[6:]} master weights + "
                 f"an fp8 copy) but {device} has {free:.0f} GiB free: run this model on a bigger machine "
                 f"(e.g. --device cuda on an H200), or --model 1.3b here")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="1.3b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timesteps", default="999,500,50")
    ap.add_argument("--latent", default="1,16,32", help="latent frames,height,width (16 channels; patch 1x2x2)")
    ap.add_argument("--master-dtype", choices=("float32", "bfloat16"), default=None,
                    help="dtype of the random master weights (default: float32 for 1.3b, bfloat16 for 14b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny config (dim 128, 2 blocks), seconds on a CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    key = "smoke" if args.smoke else args.model
    cfg = SMOKE if args.smoke else CONFIGS[args.model]
    master_dtype = getattr(torch, args.master_dtype) if args.master_dtype else MASTER_DTYPE[key]
    f, h, w = (int(v) for v in (("1,4,6" if args.smoke else args.latent).split(",")))
    timesteps = [int(v) for v in args.timesteps.split(",") if v.strip()]
    check_memory(cfg, master_dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle is float32 matmuls, not TF32

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, 16, f, h, w, generator=g).to(device)
    ctx = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) * 0.1).to(device)
    tokens = f * (h // 2) * (w // 2)
    name = "smoke" if args.smoke else f"T2V-{args.model.upper()}"
    head = (f"{name}: dim {cfg.dim}, {cfg.layers} blocks, random weights ({str(master_dtype)[6:]} master, seed "
            f"{args.seed}); latent 1x16x{f}x{h}x{w} ({tokens} tokens), text {cfg.text_len}x{cfg.text_dim}; "
            f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(head, flush=True)

    master = random_master(cfg, master_dtype, device, args.seed)
    print(f"  {sum(p.numel() for p in master.parameters()) / 1e9:.3f} B parameters", flush=True)

    def velocities(model, label):
        out = {}
        for t in timesteps:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out[t] = model(x, torch.tensor([t], device=device), ctx).float()
            print(f"  {label:<22} t={t:<4} {time.perf_counter() - t0:6.1f} s", flush=True)
        return out

    master.compute_dtype = torch.float32  # a bf16 master runs in float32 too: each layer upcasts its weight
    ref = velocities(master, "float32 (oracle)")
    results = {"config": name, "dim": cfg.dim, "layers": cfg.layers, "tokens": tokens,
               "latent": [1, 16, f, h, w], "master_dtype": str(master_dtype)[6:], "seed": args.seed,
               "device": str(device), "torch": torch.__version__,
               "velocity": {t: {"mean_abs": v.abs().mean().item(), "max_abs": v.abs().max().item(),
                                "rms": v.pow(2).mean().sqrt().item()} for t, v in ref.items()},
               "modes": {}}
    bf16 = None
    skipped = {}
    for mode in MODES:
        if mode == loading.SCALED_MM:
            why = scaled_mm_unsupported(device)
            if why:
                print(f"  {mode} skipped: {why}")
                skipped[mode] = why
                continue
        model = weight_mode(master, mode)
        werr = weight_error(master, model)
        out = velocities(model, mode)
        del model
        if mode == "bf16":
            bf16 = out
        results["modes"][mode] = {"weight_rel_l2": werr, "per_t": {t: {
            "vs_fp32": compare(out[t], ref[t]), "vs_bf16": None if mode == "bf16" else compare(out[t], bf16[t]),
        } for t in timesteps}}
    results["skipped"] = skipped

    table = render(head, results, timesteps)
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def render(head, results, timesteps):
    lines = [head, "",
             "| t | weights / matmul | vs float32: max abs | mean abs | rel L2 | vs bf16: max abs | mean abs | rel L2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in timesteps:
        for mode, r in results["modes"].items():
            a, b = r["per_t"][t]["vs_fp32"], r["per_t"][t]["vs_bf16"]
            right = "— | — | —" if b is None else f"{b['max_abs']:.4f} | {b['mean_abs']:.5f} | {b['rel_l2']:.2e}"
            lines.append(f"| {t} | {mode} | {a['max_abs']:.4f} | {a['mean_abs']:.5f} | {a['rel_l2']:.2e} | {right} |")
    lines.append("")
    v = results["velocity"]
    lines.append("float32 velocity: " + "; ".join(
        f"t={t} mean |v| {v[t]['mean_abs']:.3f}, max |v| {v[t]['max_abs']:.2f}" for t in timesteps))
    werr = [f"{m} {r['weight_rel_l2']:.2e}" for m, r in results["modes"].items() if r["weight_rel_l2"] is not None]
    lines.append("block Linear weights, relative L2 of the stored (dequantised) weights vs the master: " + ", ".join(werr))
    for mode, why in results["skipped"].items():
        lines.append(f"{mode}: not measured — {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
