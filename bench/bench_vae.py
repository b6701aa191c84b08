"""Wan-VAE benchmark: this pack's streaming VAE against diffusers' AutoencoderKLWan and ComfyUI's own Wan VAE
(comfy.ldm.wan.vae.WanVAE, when a ComfyUI tree is given), all with the same random weights.

    python bench/bench_vae.py                              # CUDA, real size, bf16 (the figures for BENCHMARKS.md)
    python bench/bench_vae.py --comfyui /path/ComfyUI      # also ComfyUI's native Wan VAE
    python bench/bench_vae.py --sizes 720p --no-tiled      # one size only, no tiled rows
    python bench/bench_vae.py --smoke --comfyui /path/ComfyUI   # tiny config on the CPU (checks the script runs)

Headline rows, per --sizes entry (480p = 480x832, 720p = 720x1280) and --frames (81): decode of the 21 latent
frames -> 81 frames and encode of the 81 frames, for each implementation in turn. Only the implementation
being measured is on the GPU (the others wait on the CPU), the allocator cache is emptied and the peak counter
reset before each timed call, so a peak (torch.cuda.max_memory_allocated during the call) is that
implementation's weights + its activations + the shared input. Each peer's warm-up output is compared with
this pack's output (max / mean |d|, relative L2; a mismatch is printed loudly) before its timed runs; timing
is the median of --runs runs after that warm-up. ComfyUI's VAE runs the way comfy/sd.py's VAE wrapper runs it
on a GPU with room: its model's own decode / encode in the VAE dtype, untiled (the wrapper tiles only after an
out-of-memory error), decode clamped to -1..1 (the wrapper's process_output; this pack and diffusers clamp
inside decode); the wrapper's copy of the result to the CPU in float32 is left out for all three.
Then: this pack's tiled decode at 720x1280x121 (tile-major, output kept on the GPU in bf16) and the spatial
tiling error against its own untiled decode on a real-size random-weight model.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import tiling  # noqa: E402
from models.wan import vae as wv  # noqa: E402
from models.wan import vae_loading as vl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_peer  # noqa: E402

GIB = 2 ** 30
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
SMOKE_SIZES = {"480p": (32, 48), "720p": (48, 64)}
# relative L2 against this pack's output: fp32 on the CPU differs by summation order only; bf16 by the
# rounding of two kernel orders
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:
                v = 0.02 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) * (1.0 / p[0].numel() ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


class Meter:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fresh(self):
        """Empty the allocator cache and reset the peak counter: the next peak is the next call's own."""
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def run(self, fn, runs, warmup=1, check=None):
        """(median seconds, peak bytes over the timed runs, last result); `check(out)` sees the warm-up output
        before any timed run."""
        out = None
        for i in range(warmup):
            out = None
            out = fn()
            self.sync()
            if check is not None and i == 0:
                check(out)
        times, peak = [], 0
        for _ in range(runs):
            out = None
            self.fresh()
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
            if self.cuda:
                peak = max(peak, torch.cuda.max_memory_allocated(self.device))
        return statistics.median(times), peak, out


def fmt_mem(b):
    return f"{b / GIB:.2f} GiB" if b else "n/a (CPU)"


def compare(out, reference, dtype):
    """max / mean |d| and relative L2 of `out` against this pack's `reference` (both brought to the CPU)."""
    d = out.detach().to("cpu", torch.float32) - reference
    rel = (d.norm() / reference.norm()).item()
    return {"max_abs_diff": d.abs().max().item(), "mean_abs_diff": d.abs().mean().item(), "rel_l2": rel,
            "ok": rel <= PARITY_TOL[dtype]}


def parse_sizes(text, table):
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        sys.exit(f"--sizes: expected a comma-separated list of {', '.join(table)}; got {text!r}")
    return names


class Impl:
    """One VAE implementation: its model (kept on the CPU between its own rows) and how it decodes / encodes."""

    def __init__(self, label, model, decode, encode):
        self.label, self.model, self.decode, self.encode = label, model, decode, encode


def implementations(args, cfg, state, dtype):
    """This pack first (its outputs are the reference), then the peers that build here, all in `dtype`."""
    ours = wv.WanVAE(**cfg)
    ours.load_state_dict(state)
    ours = ours.to(dtype).eval().requires_grad_(False)
    if args.channels_last:
        ours.set_channels_last(True)
    impls = [Impl("cvg", ours, lambda m, z: m.decode(z), lambda m, x: m.encode(x))]
    if not args.no_diffusers:
        try:
            from diffusers import AutoencoderKLWan
            ref = AutoencoderKLWan(base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"],
                                   num_res_blocks=cfg["num_res_blocks"],
                                   temperal_downsample=cfg["temperal_downsample"])
            ref.load_state_dict(vl.wan_to_diffusers(state, cfg["num_res_blocks"]))
        except Exception as e:  # not installed, or an environment where it does not import
            print(f"diffusers skipped: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
        else:
            impls.append(Impl("diffusers", ref.to(dtype).eval().requires_grad_(False),
                              lambda m, z: m.decode(z).sample, lambda m, x: m.encode(x).latent_dist.mode()))
    if args.comfyui:
        try:
            comfy = comfy_peer.import_comfy(args.comfyui, args.device)
            print(comfy_peer.describe(comfy))
            native = comfy_peer.wan_vae(comfy, state, cfg, "cpu", dtype)
        except Exception as e:  # a tree with another WanVAE signature, or a dependency missing
            print(f"comfyui skipped: {type(e).__name__}: {e}")
        else:
            impls.append(Impl("comfyui", native, lambda m, z: m.decode(z).clamp_(-1.0, 1.0),
                              lambda m, x: m.encode(x)))
    return impls


def measure(meter, impl, op, inp, runs, reference, dtype):
    """One row: `impl` on the device, `op` ("decode" / "encode") on `inp`, checked against `reference`
    (None for this pack, whose output becomes the reference) before its timed runs; back on the CPU after."""
    impl.model.to(meter.device)
    fn = getattr(impl, op)
    row = {}

    def check(out):
        if reference is not None:
            row.update(compare(out, reference, dtype))
            verdict = "ok" if row["ok"] else f"!!! MISMATCH: beyond {PARITY_TOL[dtype]:.0e}, timing not comparable !!!"
            print(f"  check {impl.label} vs cvg, same weights and input: max |d| {row['max_abs_diff']:.4f}, mean "
                  f"{row['mean_abs_diff']:.5f}, relative L2 {row['rel_l2']:.2e} {verdict}")

    meter.fresh()
    t, peak, out = meter.run(lambda: fn(impl.model, inp), runs, check=check)
    row.update({"seconds": t, "peak_bytes": peak, "shape": list(out.shape)})
    out = out.to("cpu", torch.float32) if reference is None else None
    impl.model.to("cpu")
    meter.fresh()
    return row, out


def headline(meter, impls, size, frames, runs, dtype, args, results):
    """Decode (latent -> frames) and encode (frames -> latent) at one size, every implementation in turn."""
    g = torch.Generator().manual_seed(1)
    h, w = SIZES_USED[size]
    lat = (1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)
    ops = {"decode": torch.randn(lat, generator=g).to(meter.device, dtype)}
    if not args.no_encode:
        ops["encode"] = (torch.rand((1, 3, frames, h, w), generator=g) * 2 - 1).to(meter.device, dtype)
    for op, inp in ops.items():
        reference = None
        for impl in impls:
            row, out = measure(meter, impl, op, inp, runs, reference, dtype)
            reference = out if reference is None else reference
            results["rows"].append({"size": size, "op": op, "impl": impl.label, **row})
            print(f"{size} {op:<6} {impl.label:<9} {list(inp.shape)} -> {row['shape']}: {row['seconds']:.3f} s, "
                  f"peak {fmt_mem(row['peak_bytes'])}")
            if impl.label == "cvg" and op == "decode" and args.variants and meter.cuda:
                unfused_norm_variant(meter, impl, inp, runs, reference, dtype, size, results)
        del reference
    del ops
    meter.fresh()


def unfused_norm_variant(meter, impl, z, runs, reference, dtype, size, results):
    wv.FAST_RMS_NORM = False
    try:
        row, _ = measure(meter, impl, "decode", z, runs, reference, dtype)
    finally:
        wv.FAST_RMS_NORM = True
    results["rows"].append({"size": size, "op": "decode", "impl": "cvg, unfused RMS norm", **row})
    print(f"{size} decode cvg, unfused RMS norm: {row['seconds']:.3f} s, peak {fmt_mem(row['peak_bytes'])}")


def summary(results):
    print("\nsummary (seconds, peak; ratio = cvg / the faster peer):")
    keys = sorted({(r["size"], r["op"]) for r in results["rows"]}, key=lambda k: (k[0], k[1] != "decode"))
    for size, op in keys:
        rows = {r["impl"]: r for r in results["rows"] if (r["size"], r["op"]) == (size, op)}
        cells = [f"{k} {r['seconds']:.3f} s / {fmt_mem(r['peak_bytes'])}" for k, r in rows.items()]
        peers = [r for k, r in rows.items() if k in ("diffusers", "comfyui")]
        line = f"  {size} {op:<6} " + " | ".join(cells)
        if "cvg" in rows and peers:
            best = min(peers, key=lambda r: r["seconds"])
            line += f" | time ratio {rows['cvg']['seconds'] / best['seconds']:.2f}x"
            if best["peak_bytes"]:
                least = min(r["peak_bytes"] for r in peers)
                line += f", peak ratio {rows['cvg']['peak_bytes'] / least:.2f}x (vs the smaller peer peak)"
        print(line)


def tiled_rows(meter, model, args, results, tiled_shape, tile, err_shape, err_tile, overlap, runs, dtype):
    device = meter.device
    g = torch.Generator().manual_seed(2)
    model.to(device)
    if not args.no_tiled:
        zt = torch.randn(tiled_shape, generator=g).to(device, dtype)
        t, peak, tiled = meter.run(lambda: tiling.decode_tiled(model, zt, tile, overlap, device, dtype), runs)
        results["tiled_decode"] = {"seconds": t, "peak_bytes": peak, "shape": list(tiled.shape),
                                   "tile_latent": list(tile), "overlap_latent": overlap,
                                   "tiles": len(tiling.TilePlan(*tiled_shape[3:], *tile, overlap))}
        print(f"cvg tiled decode {list(zt.shape)} -> {list(tiled.shape)} (tiles {tile} latent px, overlap "
              f"{overlap}): {t:.3f} s, peak {fmt_mem(peak)}")
        del tiled, zt
        meter.fresh()

    # spatial tiling error against the untiled decode, real-size random weights
    ze = torch.randn(err_shape, generator=g).to(device, dtype)
    full = model.decode(ze).float()
    tiled = tiling.decode_tiled(model, ze, err_tile, overlap, device, torch.float32)
    e = (tiled - full).abs()
    results["tiling_error"] = {"shape": list(err_shape), "tile_latent": list(err_tile),
                               "overlap_latent": overlap, "mean_abs": e.mean().item(),
                               "max_abs": e.max().item(), "p99_abs": e.flatten()[::97].float().quantile(0.99).item(),
                               "output_std": full.std().item()}
    print(f"tiling error {list(err_shape)} tiles {err_tile} overlap {overlap}: mean |d| "
          f"{e.mean().item():.4f}, p99 {results['tiling_error']['p99_abs']:.4f}, max {e.max().item():.4f} "
          f"(output std {full.std().item():.3f})")


SIZES_USED = SIZES


def main():
    global SIZES_USED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (median), after one warm-up")
    ap.add_argument("--sizes", "--size", default="480p,720p", help="comma-separated: 480p (480x832), 720p (720x1280)")
    ap.add_argument("--frames", type=int, default=81, help="video frames of the headline rows (4k+1)")
    ap.add_argument("--comfyui", default=None, help="path of a ComfyUI tree: also time its native Wan VAE")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-tiled", action="store_true", help="skip the tiled 720x1280x121 decode row")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--contiguous", action="store_true", help="keep NCDHW activations (default: channels-last)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--variants", action="store_true",
                    help="also time this pack's decode with the fused RMS norm off (CUDA)")
    args = ap.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
        SIZES_USED, frames = SMOKE_SIZES, 5
        tiled_shape, tile, runs = (1, 16, 2, 6, 8), (4, 5), 1
        err_shape, err_tile = (1, 16, 2, 6, 8), (4, 5)
        overlap = 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = wv.WanVAEConfig().to_dict()
        frames = args.frames
        tiled_shape, tile, runs = (1, 16, 31, 90, 160), (48, 88), args.runs
        err_shape, err_tile = (1, 16, 3, 60, 104), (36, 60)
        overlap = tiling.DEFAULT_OVERLAP
    if (frames - 1) % 4:
        sys.exit(f"--frames {frames}: the Wan VAE needs 4k+1 frames (e.g. 81)")
    sizes = parse_sizes(args.sizes, SIZES_USED)
    args.device = device
    args.channels_last = device.type == "cuda" and not args.contiguous
    torch.backends.cudnn.benchmark = True

    meter = Meter(device)
    with torch.device("cpu"):
        state = randomize(wv.WanVAE(**cfg)).state_dict()
    impls = implementations(args, cfg, state, dtype)
    weights = sum(p.numel() * p.element_size() for p in impls[0].model.parameters())
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "torch": torch.__version__, "weights_bytes": weights,
               "channels_last": args.channels_last, "frames": frames, "rows": []}
    print(f"device {results['device']}, {dtype}, torch {torch.__version__}, weights {fmt_mem(weights)}, "
          f"implementations: {', '.join(i.label for i in impls)}")

    with torch.inference_mode():
        for size in sizes:
            headline(meter, impls, size, frames, runs, dtype, args, results)
        ours = impls[0].model
        del impls
        tiled_rows(meter, ours, args, results, tiled_shape, tile, err_shape, err_tile, overlap, runs, dtype)

    summary(results)
    mismatches = [r for r in results["rows"] if r.get("ok") is False]
    if mismatches:
        print(f"!!! {len(mismatches)} row(s) did not match this pack's output: "
              + ", ".join(f"{r['size']} {r['op']} {r['impl']}" for r in mismatches))
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
