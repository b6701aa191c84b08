"""Quality cost of the speed options on the bundled demo models (models/demo/weights), on the CPU.

    python bench/bench_speed.py                         # T2V demo, 4 captions x 20 steps, thresholds 0.05..0.3
    python bench/bench_speed.py --smoke                 # 1 caption, 4 steps (checks the script runs)
    python bench/bench_speed.py --device cuda --seeds 16   # same table on a GPU

For every setting the 17-frame 64x64 clip is sampled from the same seed and caption as the plain (uncached,
unbatched, float32) run, decoded with the demo VAE, and compared with the plain run's decoded clip:
PSNR (pixels 0..1) of the worst clip and of all clips pooled, max |Δ| of the pixels, max |Δ| of the latent, and the number of forwards
that ran every block (CFG: two per step; the step cache's skipped forwards ran one block of 4). Settings:
batched CFG; the first-block step cache at each --thresholds value (cond and uncond decided separately);
fp8 e4m3 block Linears through torch._scaled_mm (per-tensor scales for weights and activations), and the same
fp8 weights upcast per layer (weight-only quantization, activations kept). Wall-clock seconds are printed but on
a shared CPU they are not a benchmark.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import checkpoints  # noqa: E402
from models.demo import captions as C  # noqa: E402
from models.demo import world  # noqa: E402
from models.wan import latent as wan_latent  # noqa: E402
from models.wan import loading, pipeline, vae_loading  # noqa: E402
from models.wan.dit import quantize_fp8_  # noqa: E402
from models.wan.step_cache import StepCache  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo", "weights")
CAPTIONS = [
    "a red circle moving right quickly on a black background",
    "a blue square moving up slowly on a white background",
    "a green triangle growing slowly on a gray background",
    "a yellow circle turning purple quickly on a black background",
]


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=4, help="clips per setting (caption i %% 4, seed i)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--thresholds", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.thresholds = 1, 4, "0.2"
    torch.manual_seed(0)
    device = torch.device(args.device)
    files = {k: os.path.join(args.weights, f"cvg_demo_{k}.safetensors") for k in ("t2v", "vae", "text_encoder")}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        sys.exit(f"demo weights missing: {missing}; see docs/model_card.md")
    dit = loading.load_wan_dit(files["t2v"], device=device, dtype=torch.float32)
    vae = vae_loading.load_wan_vae(files["vae"], dtype=torch.float32, device=device)
    enc = C.CaptionEncoder()
    enc.load_state_dict({k: v.float() for k, v in checkpoints.read_state_dict(files["text_encoder"]).items()})
    enc.eval()
    with torch.no_grad():
        neg = enc.encode("").to(device)
        texts = [enc.encode(CAPTIONS[i % len(CAPTIONS)]).to(device) for i in range(args.seeds)]

    z0 = torch.zeros(1, 16, wan_latent.latent_frames(args.frames), world.SIZE // 8, world.SIZE // 8, device=device)

    def sample(model, i, **kw):
        t0 = time.perf_counter()
        z = pipeline.sample_video(model, texts[i], neg, z0, seed=i, steps=args.steps, cfg=args.cfg, shift=args.shift,
                                  solver="unipc", **kw)
        with torch.no_grad():
            video = ((vae.decode(z).float() + 1) / 2).clamp(0, 1).cpu()
        return z.cpu(), video, time.perf_counter() - t0

    plain = [sample(dit, i) for i in range(args.seeds)]
    total = 2 * args.steps * args.seeds
    rows = [("plain (reference)", total, math.inf, math.inf, 0.0, 0.0, sum(p[2] for p in plain))]

    def measure(label, model=dit, make_kw=lambda: {}, forwards=None):
        ps, mses, vmax, zmax, secs, full = [], [], 0.0, 0.0, 0.0, 0
        for i in range(args.seeds):
            kw = make_kw()
            z, video, s = sample(model, i, **kw)
            ps.append(psnr(video, plain[i][1]))
            mses.append(((video - plain[i][1]) ** 2).mean().item())
            vmax = max(vmax, (video - plain[i][1]).abs().max().item())
            zmax = max(zmax, (z - plain[i][0]).abs().max().item())
            secs += s
            full += forwards(kw) if forwards else 2 * args.steps
        pooled = sum(mses) / len(mses)
        mean = math.inf if pooled == 0 else 10 * math.log10(1.0 / pooled)  # PSNR of all clips together
        rows.append((label, full, min(ps), mean, vmax, zmax, secs))
        print(f"{label:<28} forwards {full:>4}/{total}  PSNR min {min(ps):6.1f} all {mean:6.1f} dB  max|Δ| px {vmax:.4f}  "
              f"latent {zmax:.4f}  {secs:.1f} s", flush=True)

    measure("batch_cfg", make_kw=lambda: {"batch_cfg": True})
    for th in [float(v) for v in args.thresholds.split(",") if v.strip()]:
        measure(f"step cache {th}", make_kw=lambda th=th: {"step_cache": StepCache(th)},
                forwards=lambda kw: kw["step_cache"].full)
    if not args.no_fp8:
        q = quantize_fp8_(copy.deepcopy(dit))
        try:
            measure("fp8 e4m3 (_scaled_mm)", model=q)
        except (RuntimeError, NotImplementedError) as e:
            print(f"fp8 skipped: torch._scaled_mm unavailable on {device} ({type(e).__name__}: {e})")
        measure("fp8 e4m3 weights, upcast", model=quantize_fp8_(copy.deepcopy(dit), scaled_mm=False))

    head = (f"T2V demo model ({os.path.basename(files['t2v'])}), {args.seeds} clips of {args.frames} frames at "
            f"{world.SIZE}x{world.SIZE}, UniPC {args.steps} steps, CFG {args.cfg}, shift {args.shift}, {device}, "
            f"torch {torch.__version__}")
    lines = [head, "", "| setting | forwards running every block | PSNR vs plain, decoded clips: worst clip / all clips | "
             "max abs error, pixels 0..1 | max abs error, latent | seconds (shared CPU, not a benchmark) |",
             "| --- | --- | --- | --- | --- | --- |"]

    def db(p):
        return "∞" if math.isinf(p) else f"{p:.1f}"
    for label, full, p, mean, vmax, zmax, secs in rows:
        pt = "—" if label.startswith("plain") else f"{db(p)} / {db(mean)} dB"
        lines.append(f"| {label} | {full} / {total} | {pt} | {vmax:.4f} | {zmax:.4f} | {secs:.1f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
