"""Wan-VAE benchmark: this pack's streaming VAE against diffusers AutoencoderKLWan, same random weights.

    python bench/bench_vae.py                 # CUDA, real size, bf16 (the figures for BENCHMARKS.md)
    python bench/bench_vae.py --smoke         # tiny config on the CPU (checks the script runs)

Measures, in one run: decode of 21 latent frames -> 81 frames at 480x832, encode of 81 frames at
480x832 (median of --runs timed runs after one warm-up; peak memory = torch.cuda.max_memory_allocated
during the call, weights included), the same through diffusers, the difference between the two outputs,
the tiled decode at 720x1280x121 (tile-major, output kept on the GPU in bf16), and the spatial tiling
error of this VAE against its own untiled decode on a real-size random-weight model.
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

GIB = 2 ** 30


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

    def run(self, fn, runs, warmup=1):
        """(median seconds, peak bytes over the timed runs, last result)."""
        out = None
        for _ in range(warmup):
            out = None
            out = fn()
            self.sync()
        times, peak = [], 0
        for _ in range(runs):
            out = None
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-tiled", action="store_true")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--contiguous", action="store_true", help="keep NCDHW activations (default: channels-last)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--variants", action="store_true",
                    help="also time the decode with the fused RMS norm off (CUDA)")
    args = ap.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
        dec_shape, enc_frames, size = (1, 16, 2, 4, 6), 5, (32, 48)
        tiled_shape, tile, runs = (1, 16, 2, 6, 8), (4, 5), 1
        err_shape, err_tile = (1, 16, 2, 6, 8), (4, 5)
        overlap = 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = {}
        dec_shape, enc_frames, size = (1, 16, 21, 60, 104), 81, (480, 832)
        tiled_shape, tile, runs = (1, 16, 31, 90, 160), (48, 88), args.runs
        err_shape, err_tile = (1, 16, 3, 60, 104), (36, 60)
        overlap = tiling.DEFAULT_OVERLAP
    torch.backends.cudnn.benchmark = True

    meter = Meter(device)
    with torch.device("cpu"):
        model = randomize(wv.WanVAE(**cfg))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(device, dtype).eval().requires_grad_(False)
    if device.type == "cuda" and not args.contiguous:
        model.set_channels_last(True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "torch": torch.__version__, "weights_bytes": weights,
               "channels_last": device.type == "cuda" and not args.contiguous}
    print(f"device {results['device']}, {dtype}, torch {torch.__version__}, weights {fmt_mem(weights)}")

    g = torch.Generator().manual_seed(1)
    z = torch.randn(dec_shape, generator=g).to(device, dtype)
    x = (torch.rand((1, 3, enc_frames) + size, generator=g) * 2 - 1).to(device, dtype)

    with torch.inference_mode():
        t, peak, ours = meter.run(lambda: model.decode(z), runs)
        results["decode"] = {"seconds": t, "peak_bytes": peak, "shape": list(ours.shape)}
        print(f"CVG decode  {list(z.shape)} -> {list(ours.shape)}: {t:.3f} s, peak {fmt_mem(peak)}")
        if args.variants and device.type == "cuda":
            wv.FAST_RMS_NORM = False
            t2, peak2, alt = meter.run(lambda: model.decode(z), runs)
            wv.FAST_RMS_NORM = True
            d = (alt.float() - ours.float()).abs().max().item()
            del alt
            results["decode_unfused_norm"] = {"seconds": t2, "peak_bytes": peak2, "max_abs_diff_vs_fused": d}
            print(f"CVG decode, unfused RMS norm: {t2:.3f} s, peak {fmt_mem(peak2)}, max |d| vs fused {d:.4f}")
        if not args.no_encode:
            t, peak, zenc = meter.run(lambda: model.encode(x), runs)
            results["encode"] = {"seconds": t, "peak_bytes": peak, "shape": list(zenc.shape)}
            print(f"CVG encode  {list(x.shape)} -> {list(zenc.shape)}: {t:.3f} s, peak {fmt_mem(peak)}")

        if not args.no_diffusers:
            try:
                from diffusers import AutoencoderKLWan
            except ImportError as e:
                print(f"diffusers not importable ({e}); skipping the reference")
            else:
                with torch.device("cpu"):
                    ref = AutoencoderKLWan(**({} if not cfg else dict(
                        base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"],
                        num_res_blocks=cfg["num_res_blocks"], temperal_downsample=cfg["temperal_downsample"])))
                ref.load_state_dict(vl.wan_to_diffusers(state, model.config.num_res_blocks))
                ref = ref.to(device, dtype).eval()
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t, peak, theirs = meter.run(lambda: ref.decode(z).sample, runs)
                diff = (theirs.float() - ours.float()).abs()
                results["diffusers_decode"] = {"seconds": t, "peak_bytes": peak,
                                               "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
                print(f"diffusers decode: {t:.3f} s, peak {fmt_mem(peak)}; |ours - diffusers| max "
                      f"{diff.max().item():.4f} mean {diff.mean().item():.5f}")
                del theirs, diff
                if not args.no_encode:
                    t, peak, zref = meter.run(lambda: ref.encode(x).latent_dist.mode(), runs)
                    diff = (zref.float() - zenc.float()).abs()
                    results["diffusers_encode"] = {"seconds": t, "peak_bytes": peak,
                                                   "max_abs_diff": diff.max().item(),
                                                   "mean_abs_diff": diff.mean().item()}
                    print(f"diffusers encode: {t:.3f} s, peak {fmt_mem(peak)}; |ours - diffusers| max "
                          f"{diff.max().item():.4f} mean {diff.mean().item():.5f}")
                    del zref, diff
                del ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model = wv.WanVAE(**cfg)
                model.load_state_dict(state)
                model = model.to(device, dtype).eval().requires_grad_(False)
                if device.type == "cuda" and not args.contiguous:
                    model.set_channels_last(True)
        del ours, x
        if device.type == "cuda":
            torch.cuda.empty_cache()

        if not args.no_tiled:
            zt = torch.randn(tiled_shape, generator=g).to(device, dtype)
            t, peak, tiled = meter.run(
                lambda: tiling.decode_tiled(model, zt, tile, overlap, device, dtype), runs)
            results["tiled_decode"] = {"seconds": t, "peak_bytes": peak, "shape": list(tiled.shape),
                                       "tile_latent": list(tile), "overlap_latent": overlap,
                                       "tiles": len(tiling.TilePlan(*tiled_shape[3:], *tile, overlap))}
            print(f"CVG tiled decode {list(zt.shape)} -> {list(tiled.shape)} (tiles {tile} latent px, overlap "
                  f"{overlap}): {t:.3f} s, peak {fmt_mem(peak)}")
            del tiled, zt
            if device.type == "cuda":
                torch.cuda.empty_cache()

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

    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
