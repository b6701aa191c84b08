"""Train the bundled demo models on the demo world, in one seeded command.

    python -m models.demo.train --out models/demo/weights --dit-object-weight 4 --dit-bounce-share 0.35
    python -m models.demo.train --out /tmp/w --smoke                  # seconds, for checking the script
(GPU if there is one, else CPU.)

In GPU calls of at most 10 minutes, split the stages (each call writes its folder, the next reads it);
the bundled weights are the five calls listed in docs/model_card.md ("Training command"), e.g.
    python -m models.demo.train --out $OUT/v --vae-seconds 430 --vae-image-share 0.3 --stop-after vae
    python -m models.demo.train --out $OUT/w --vae-from v --dit-seconds 390 --eval 16
    python -m models.demo.train --out $OUT/w2 --vae-from w --dit-from w --dit-seconds 450 \
        --dit-object-weight 4 --dit-bounce-share 0.35                                     # more DiT steps
(`--vae-from DIR --vae-phases video` continues the VAE's video phase from an earlier VAE.)

Stages (all in this process, in order):
1. Wan-VAE architecture autoencoder (`WanVAE`, tiny config VAE_CONFIG), started as a per-frame image
   autoencoder (`init_per_frame`), on single frames and then 17-frame clips: weighted L1 +
   MSE reconstruction (object pixels weigh more), decoded from mu + small noise, plus a penalty that pulls
   the per-channel batch mean/std of the latent to Wan's fixed LATENT_MEAN/LATENT_STD, so that
   `latent.normalize` gives roughly unit-variance DiT inputs like the real VAE.
2. A dataset of 17-frame clips is rendered and encoded once with the frozen VAE (DiT space); with
   `--dit-bounce-share` that share of the clips may reach a wall and bounce (as long clips do).
3. Jointly: the caption encoder, a T2V `WanDiT` (in_dim 16) and a known-frame `WanDiT` (in_dim 36:
   noisy latent | 4-channel frame mask | condition latent, models/conditioning.py conventions), flow
   matching with the sampler's convention x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0, t = σ·1000.
   10 % of captions are dropped to "" (classifier-free guidance). The known-frame model is trained on
   the known-frame sets of FRAME_SETS (I2V, extension by 5 / 9 frames, first+last, every 4th frame, and
   none = the frame-unconditional branch), with conditional latent perturbation z_s = (1−s)·z + s·ε,
   s ~ U(0, 0.3) on 40 % of samples (only on latent frames that hold known frames).
   `--dit-object-weight` up-weights the latent cells that show the object; bouncing clips train only the
   known-frame model.
4. A quick evaluation (T2V prompt adherence, I2V frame-0 PSNR) with the pack's own sampler, written
   to train_report.json next to the weights.

`--vae-seconds/--dit-seconds` cap the wall-clock time of stages 1 and 3: the step count is then fixed
after timing the first steps and written to train_report.json; pass it back with `--vae-steps/--dit-steps`
(and no time cap) to repeat a run step for step.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import conditioning as cond
from .. import sampling
from ..wan import latent as wan_latent
from ..wan.vae import CausalConv3d, Resample, WanVAE
from . import captions as C
from . import metrics, world

VAE_CONFIG = {"dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
              "temperal_downsample": [False, True, True]}
# head_dim 64: models/wan/loading.detect_config derives heads from dim (128 if dim % 128 == 0, else 64).
DIT_CONFIG = {"model_type": "t2v", "dim": 192, "ffn_dim": 512, "heads": 3, "layers": 4,
              "text_dim": C.TEXT_DIM, "in_dim": 16, "out_dim": 16, "freq_dim": 256}
# The known-frame model is a Wan "i2v" model (36 input channels) used without image tokens
# (image_strength 0); its unused CLIP branch is kept tiny (image_dim 32).
I2V_OVERRIDES = {"model_type": "i2v", "in_dim": 36, "image_dim": 32}
ENCODER_CONFIG = {"dim": C.TEXT_DIM, "layers": 2, "heads": 4, "ffn": 128}
FRAMES = 17
FRAME_SETS = {  # known pixel frames of a 17-frame clip -> sampling weight
    "i2v": ((0,), 0.35),
    "extend5": (tuple(range(5)), 0.15),
    "extend9": (tuple(range(9)), 0.10),
    "first_last": ((0, 16), 0.15),
    "every4": ((0, 4, 8, 12, 16), 0.10),
    "none": ((), 0.15),
}
FILES = {"vae": "cvg_demo_vae.safetensors", "t2v": "cvg_demo_t2v.safetensors",
         "i2v": "cvg_demo_i2v.safetensors", "text": "cvg_demo_text_encoder.safetensors"}


def build_dit(**overrides):
    from ..wan.dit import WanDiT  # imported late: the DiT module may be absent in a partial checkout
    return WanDiT(**{**DIT_CONFIG, **overrides})


# ------------------------------------------------------------------------------------------ data

def make_clips(n, frames, seed, device, batch=512, bounce_share=0.0):
    """n deterministic (caption, clip) pairs: captions list, video [n, 3, T, H, W] in -1..1 (CPU) and a [n]
    bool tensor, True where the clip may bounce. That share (`bounce_share`) of the clips is rendered with
    safe=False: the start is anywhere, so the object may bounce off a wall (or its radius off R_MIN/R_MAX)
    within the clip, as it does in long clips. Safe clips never show a wall, so a model trained on them
    alone has never seen what a segment continuing an object near a wall should do."""
    gen = torch.Generator().manual_seed(seed)
    caps = [C.random_caption(gen) for _ in range(n)]
    seeds = torch.randint(2 ** 31 - 1, (n,), generator=gen).tolist()
    bounce = torch.rand(n, generator=gen) < bounce_share  # drawn last: captions and seeds stay as without it
    out = torch.empty(n, 3, frames, world.SIZE, world.SIZE, dtype=torch.float16)
    for flag in (False, True):
        idx = bounce.nonzero().flatten() if flag else (~bounce).nonzero().flatten()
        for i in range(0, len(idx), batch):
            sel = idx[i:i + batch].tolist()
            v = world.render_batch([caps[j] for j in sel], frames, seeds=[seeds[j] for j in sel], device=device,
                                   safe=not flag)
            out[sel] = (v.permute(0, 4, 1, 2, 3) * 2 - 1).to(torch.float16).cpu()
    return caps, out, bounce


def latent_object_mask(clips):
    """[n,1,T_lat,H/8,W/8] uint8: latent cells whose pixels (in any of their frames) show the object.
    Latent frame 0 is pixel frame 0; latent frame k covers pixel frames 4k-3..4k (the 4k+1 rule)."""
    obj = _object_pixels(clips).float()
    obj = torch.cat([obj[:, :, :1].repeat(1, 1, 4, 1, 1), obj[:, :, 1:]], 2)  # 4·T_lat frames
    return F.max_pool3d(obj, (4, 8, 8)).to(torch.uint8)


def _object_pixels(x):
    """[B,1,T,H,W] bool: pixels of clips [B,3,T,H,W] that differ from the clip's corner pixel (always
    background)."""
    return (x - x[:, :, :1, :1, :1]).abs().sum(1, keepdim=True) > 0.1


def _object_weight(x):
    """1 on background, 5 on the object's pixels."""
    return 1.0 + 4.0 * _object_pixels(x).float()


# ------------------------------------------------------------------------------------------- VAE

def train_vae(args, device, log, vae=None, phases=("image", "video")):
    """Two phases: single frames (one encoder chunk and one decoder frame per step, so several times more
    steps per second: shapes and colours), then clips of the DiT's length (motion, and the causal cache
    over every latent frame the DiT produces; a VAE trained on 9 frames fell apart after its 3rd latent
    frame on 17-frame clips)."""
    torch.manual_seed(args.seed)
    if vae is None:
        vae = WanVAE(VAE_CONFIG)
        if args.vae_init == "per-frame":
            init_per_frame(vae)
    vae = vae.to(device).train().requires_grad_(True)
    vae.set_max_piece_elems(1 << 31)  # no time splitting of large training batches (fewer kernel launches)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    report = {}
    all_phases = (("image", 1, args.vae_image_batch, args.vae_image_steps, args.vae_seconds * args.vae_image_share),
              ("video", FRAMES, args.vae_batch, args.vae_steps, args.vae_seconds * (1 - args.vae_image_share)))
    for i, (name, frames, batch, steps, seconds) in enumerate(all_phases):
        if name not in phases:
            continue
        _, clips, _ = make_clips(args.vae_clips, frames, args.seed + 1 + 10 * i, device)
        report[name] = _vae_phase(vae, opt, clips.to(device), batch, steps, seconds, args, gen, log, name)
    vae.eval().requires_grad_(False)
    return vae, {**report, "clips": args.vae_clips}


@torch.no_grad()
def init_per_frame(vae):
    """Start the VAE as a per-frame image autoencoder: every causal conv's past-frame taps zeroed (the
    current tap scaled by sqrt(kernel_t) to keep the init's output scale), each temporal downsample
    keeping its newest frame and each temporal upsample repeating its frame. Single-frame training
    (the image phase) never reaches the past taps, so with a random init they were noise when the
    video phase began: its loss jumped from 0.04 to 0.5 and 266 video steps only got it back to 0.26
    (session-2 run 2). From this init the video phase starts at image quality with held frames."""
    time_convs = [m.time_conv for m in vae.modules() if isinstance(m, Resample) and hasattr(m, "time_conv")]
    for conv in time_convs:
        conv.weight.zero_()
        conv.bias.zero_()
        eye = torch.eye(conv.in_channels)
        for k in range(conv.out_channels // conv.in_channels):  # upsample: 2 output frames per frame
            conv.weight[k * conv.in_channels:(k + 1) * conv.in_channels, :, -1, 0, 0] = eye
    for m in vae.modules():
        if isinstance(m, CausalConv3d) and m.kernel_size[0] > 1 and not any(m is c for c in time_convs):
            m.weight[:, :, -1] *= m.kernel_size[0] ** 0.5
            m.weight[:, :, :-1] = 0


def _autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")


def _vae_phase(vae, opt, clips, batch, steps, seconds, args, gen, log, name):
    device = clips.device
    mean = torch.tensor(wan_latent.LATENT_MEAN, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan_latent.LATENT_STD, device=device).view(1, -1, 1, 1, 1)
    budget = StepBudget(seconds, log, f"vae {name}")
    t0 = budget.t0
    step, last = 0, {}
    run = torch.zeros(2, device=device)  # summed on the device: a host sync per step idles the GPU
    while step < steps:
        x = clips[torch.randint(clips.shape[0], (batch,), generator=gen).to(device)].float()
        if step % 2:
            x = x.flip(-1)
        with _autocast(args, device):
            z = vae.encode(x).float()
            zc = ((z - mean) / std).transpose(0, 1).reshape(z.shape[1], -1)
            stat = (zc.mean(1) ** 2).mean() + ((zc.std(1) - 1) ** 2).mean()
            y = decode_unclamped(vae, z + args.vae_latent_noise * torch.randn_like(z) * std).float()
        w = _object_weight(x)
        rec = (w * (y - x).abs()).mean() + (w * (y - x) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, args.vae_lr)
        opt.zero_grad(set_to_none=True)
        (rec + args.vae_stat_weight * stat).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run += torch.stack([rec.detach(), stat.detach()])
        steps = budget.fit(step, steps)
        if step % 100 == 0 or step == steps:
            k = step % 100 or 100
            rec_mean, stat_mean = (run / k).tolist()
            last = {"step": step, "rec_mean": rec_mean, "stat_mean": stat_mean}
            run.zero_()
            log(f"vae {name} {last} {time.time() - t0:.0f}s")
    return {"steps": step, "seconds": time.time() - t0, **last, "batch": batch,
            "frames": clips.shape[2]}


def decode_unclamped(vae, z):
    """WanVAE.decode without the final clamp to [-1, 1] (a clamp stops the gradient of saturated
    pixels, which stalled the first training attempt); same per-latent-frame loop with a carried cache."""
    state = {}
    frames = [vae.decoder(vae.conv2(z[:, :, t:t + 1]), state) for t in range(z.shape[2])]
    return torch.cat(frames, 2)


# The first steps include torch.compile and cuDNN autotuning; timing them made the first GPU run stop
# after a fraction of its time budget, so the step count comes from steps timed after a warm-up. Those
# early steps can also be faster than the later ones (session 3: 112 ms timed, 143 ms on average, so a
# 390 s cap ran 476 s), so the count is re-fitted, only ever lowered, at later steps from the recent rate.
WARMUP_STEPS, TIMED_STEPS = 10, 20
REFIT_STEPS = (100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class StepBudget:
    """The step count of a time-capped stage: `fit(step, steps)` after each step returns the (possibly
    lowered) total: first from TIMED_STEPS steps timed after WARMUP_STEPS, then again at each of
    REFIT_STEPS from the step time since the previous fit."""

    def __init__(self, seconds, log, name, clock=time.time):
        self.seconds, self.log, self.name, self.clock = seconds, log, name, clock
        self.t0 = clock()
        self.mark = None  # (step, time) of the warm-up's end or of the last fit

    def fit(self, step, steps):
        if not self.seconds:
            return steps
        if step == WARMUP_STEPS:
            self.mark = (step, self.clock())
        if self.mark is None or (step != WARMUP_STEPS + TIMED_STEPS and step not in REFIT_STEPS):
            return steps
        now = self.clock()
        per = (now - self.mark[1]) / (step - self.mark[0])
        self.mark = (step, now)
        left = self.seconds - (now - self.t0)
        fitted = min(steps, max(step, step + int(left / per)))
        if step == WARMUP_STEPS + TIMED_STEPS or fitted < steps:
            self.log(f"{self.name}: {per * 1000:.1f} ms/step (steps before {step}) -> {fitted} steps")
        return fitted


def _lr(step, steps, base, warmup=100):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def encode_normalised(vae, video, batch=256):
    out = []
    for i in range(0, video.shape[0], batch):
        z = vae.encode(video[i:i + batch].to(vae.device, torch.float32))
        out.append(wan_latent.normalize(z).to(torch.float32))
    return torch.cat(out)


@torch.no_grad()
def vae_quality(vae, device, seed, n=64):
    caps, clips, _ = make_clips(n, FRAMES, seed, device)
    ok = 0
    ps = []
    zs = []
    for i in range(0, n, 32):
        x = clips[i:i + 32].to(device, torch.float32)
        z = vae.encode(x)
        zs.append(wan_latent.normalize(z).transpose(0, 1).reshape(16, -1))
        y = vae.decode(z)
        for j in range(x.shape[0]):
            a = ((x[j] + 1) / 2).permute(1, 2, 3, 0).cpu()
            b = ((y[j] + 1) / 2).permute(1, 2, 3, 0).cpu()
            ps.append(world.psnr(a, b))
            ok += metrics.adherence(caps[i + j], b)["all"]
    zc = torch.cat(zs, 1)
    return {"recon_psnr_db": sum(ps) / len(ps), "recon_adherence": ok / n,
            "latent_norm_mean_abs": float(zc.mean(1).abs().mean()), "latent_norm_std_mean": float(zc.std(1).mean())}


# ------------------------------------------------------------------------------------------- DiT

def build_dit_dataset(vae, args, device, log):
    t0 = time.time()
    n = args.dit_clips
    caps, clips, bounce = make_clips(n, FRAMES, args.seed + 3, device, bounce_share=args.dit_bounce_share)
    x0 = encode_normalised(vae, clips)
    gen = torch.Generator().manual_seed(args.seed + 4)
    names = list(FRAME_SETS)
    probs = torch.tensor([FRAME_SETS[k][1] for k in names])
    kind = torch.multinomial(probs, n, replacement=True, generator=gen)
    cvid = torch.zeros_like(clips)
    h = w = world.SIZE // 8
    masks = torch.stack([cond.frame_mask(FRAMES, FRAME_SETS[k][0], h, w) for k in names])  # [K,4,T,h,w]
    for ki, k in enumerate(names):
        sel = kind == ki
        for f in FRAME_SETS[k][0]:
            cvid[sel, :, f] = clips[sel, :, f]
    ycond = encode_normalised(vae, cvid)
    ycond[(kind == names.index("none")).to(ycond.device)] = 0.0
    obj = torch.cat([latent_object_mask(clips[i:i + 1024].to(device)).cpu() for i in range(0, n, 1024)])
    ids, lengths = C.batch_tokens([c.text() for c in caps])
    log(f"dit dataset: {n} clips in {time.time() - t0:.0f}s; latent std {float(x0.std()):.3f}")
    return {"x0": x0, "y": ycond, "kind": kind, "masks": masks, "ids": ids, "lengths": lengths,
            "obj": obj, "bounce": bounce, "captions": caps}


def train_dits(vae, data, args, device, log):
    torch.manual_seed(args.seed + 5)
    enc = C.CaptionEncoder(**ENCODER_CONFIG).to(device).train()
    t2v = build_dit().to(device).train()
    i2v = build_dit(**I2V_OVERRIDES).to(device).train()
    for m in (t2v, i2v):
        m.gelu_epilogue = False  # an inference fast path; training runs the plain FFN
    if args.dit_from:  # continue an earlier run (a fresh warm-up and schedule)
        for name, model in (("text", enc), ("t2v", t2v), ("i2v", i2v)):
            model.load_state_dict(_load(args.dit_from, name, device))
    params = list(enc.parameters()) + list(t2v.parameters()) + list(i2v.parameters())
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.01)
    n = data["x0"].shape[0]
    gen = torch.Generator().manual_seed(args.seed + 6)
    # noise drawn on the device: on the CPU, two [B,16,5,8,8] normals per step plus their synchronous copies
    # kept the GPU idle for a large share of each step
    noise_gen = torch.Generator(device).manual_seed(args.seed + 7)
    dev = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    x0_all, y_all, kind_all = dev(data["x0"]), dev(data["y"]), dev(data["kind"])
    masks, ids_all, len_all = dev(data["masks"]), dev(data["ids"]), dev(data["lengths"])
    obj_all = dev(data["obj"])
    # T2V trains on the safe clips only: a caption's direction is the clip's net motion there, while a
    # bouncing clip may move the other way; the known-frame model (which continues long videos) sees both
    t2v_keep_all = dev((~data["bounce"]).float())
    empty_ids, empty_len = C.batch_tokens([""])
    empty_ids, empty_len = dev(empty_ids), dev(empty_len)
    steps = args.dit_steps
    budget = StepBudget(args.dit_seconds, log, "dit")
    t0 = budget.t0
    step = 0
    last = {}
    B = args.dit_batch
    run = torch.zeros(2, device=device)  # summed on the device (no host sync per step)
    while step < steps:
        idx = dev(torch.randint(n, (B,), generator=gen))
        drop = dev(torch.rand(B, generator=gen) < 0.1)  # torch.where: boolean indexing syncs the host
        ids = torch.where(drop[:, None], empty_ids, ids_all[idx])
        lengths = torch.where(drop, empty_len, len_all[idx])
        with _autocast(args, device):
            loss_t2v, loss_i2v = _dit_losses(enc, t2v, i2v, ids, lengths, x0_all[idx], kind_all[idx], y_all[idx],
                                             masks, gen, noise_gen, dev,
                                             weight=1.0 + args.dit_object_weight * obj_all[idx].float(),
                                             t2v_keep=t2v_keep_all[idx])
        loss = loss_t2v + loss_i2v
        lr = _lr(step, steps, args.dit_lr, warmup=200)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run += torch.stack([loss_t2v.detach(), loss_i2v.detach()])
        steps = budget.fit(step, steps)
        if step % 200 == 0 or step == steps:
            k = step % 200 or 200
            t2v_mean, i2v_mean = (run / k).tolist()
            last = {"step": step, "loss_t2v_mean": t2v_mean, "loss_i2v_mean": i2v_mean}
            run.zero_()
            log(f"dit {last} {time.time() - t0:.0f}s")
    for m in (enc, t2v, i2v):
        m.eval().requires_grad_(False)
    return enc, t2v, i2v, {"steps": step, "seconds": time.time() - t0, **last, "batch": B,
                           "clips": n}


def _weighted_mse(pred, target, weight):
    """Mean squared error with a per-cell weight [B,1,T,h,w], normalised so that weight 1 is plain MSE."""
    # clamped: a batch whose every clip is dropped (weight 0) gives loss 0, not 0/0
    return ((pred.float() - target) ** 2 * weight).sum() / (weight.sum() * target.shape[1]).clamp_min(1e-6)


def _dit_losses(enc, t2v, i2v, ids, lengths, x0, kind, ycond, masks, gen, noise_gen, dev, weight=None,
                t2v_keep=None):
    """Flow-matching losses of both DiTs on one batch (same clips, sigma and noise; the known-frame model
    with its own frame sets and conditional latent perturbation). `weight` [B,1,T,h,w] (default 1)
    up-weights latent cells: the object covers a few of the 8×8 cells, and its corners are what tells a
    square from a circle, while a plain MSE is dominated by the flat background. `t2v_keep` [B] (default 1)
    drops clips from the T2V loss."""
    B = x0.shape[0]
    ctx = enc(ids, lengths)
    # sigma: half logit-normal, half uniform
    u = torch.rand(B, generator=gen)
    ln = torch.sigmoid(torch.randn(B, generator=gen))
    sigma = dev(torch.where(torch.rand(B, generator=gen) < 0.5, ln, u).clamp(1e-3, 1.0))
    eps = torch.randn(x0.shape, generator=noise_gen, device=x0.device)
    s5 = sigma.view(-1, 1, 1, 1, 1)
    xs = (1 - s5) * x0 + s5 * eps
    target = eps - x0
    if weight is None:
        weight = torch.ones_like(x0[:, :1])
    keep = weight if t2v_keep is None else weight * t2v_keep.view(-1, 1, 1, 1, 1)
    loss_t2v = _weighted_mse(t2v(xs, sigma * 1000, ctx), target, keep)
    mask = masks[kind]
    pert = dev((torch.rand(B, generator=gen) < 0.4).float() * torch.rand(B, generator=gen) * 0.3)
    known_lat = (mask.amax(dim=(1, 3, 4)) > 0).float()[:, None, :, None, None]
    pe = torch.randn(ycond.shape, generator=noise_gen, device=x0.device)
    p5 = pert.view(-1, 1, 1, 1, 1) * known_lat
    y = torch.cat([mask, (1 - p5) * ycond + p5 * pe], 1)
    loss_i2v = _weighted_mse(i2v(xs, sigma * 1000, ctx, y=y, image_strength=0.0), target, weight)
    return loss_t2v, loss_i2v


# ------------------------------------------------------------------------------------------- eval

@torch.no_grad()
def generate(dit, enc, caption, seed, device, steps=20, shift=3.0, guidance=4.0, y=None,
             frames=FRAMES, solver="unipc"):
    """Normalised latent [1,16,T,8,8] sampled with the pack's sampler (CFG on the caption)."""
    t_lat = wan_latent.latent_frames(frames)
    x = sampling.seeded_noise((1, 16, t_lat, world.SIZE // 8, world.SIZE // 8), seed).to(device)
    c = enc.encode(caption).to(device)
    u = enc.encode("").to(device)
    sig = sampling.wan_sigmas(steps, shift, solver)

    def vel(xx, s):
        t = torch.full((2,), float(sampling.timestep(s)), device=device)
        ctx = torch.zeros(2, max(c.shape[1], u.shape[1]), c.shape[2], device=device)
        ctx[0, : c.shape[1]] = c[0]
        ctx[1, : u.shape[1]] = u[0]
        kw = {} if y is None else {"y": y.expand(2, -1, -1, -1, -1), "image_strength": 0.0}
        out = dit(xx.expand(2, -1, -1, -1, -1), t, ctx, **kw)
        return sampling.cfg(out[:1], out[1:], guidance)

    return sampling.sample(vel, x, sig, solver)


def to_images(vae, z_norm):
    video = vae.decode(wan_latent.denormalize(z_norm.to(vae.device, vae.dtype)))
    return ((video[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).cpu()


@torch.no_grad()
def evaluate(vae, enc, t2v, i2v, device, n, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    res = {"t2v_all": 0, "t2v_colour": 0, "t2v_shape": 0, "t2v_motion": 0, "i2v_psnr0": [], "i2v_all": 0}
    for i in range(n):
        cap = C.random_caption(gen, motions=("moving",))
        a = metrics.adherence(cap, to_images(vae, generate(t2v, enc, cap.text(), i, device)))
        for k in ("all", "colour", "shape", "motion"):
            res[f"t2v_{k}"] += a[k]
        ref = world.render(cap, FRAMES, seed=10_000 + i)
        y = cond.build_condition(lambda v: vae.encode(v.to(device)), {0: ref[0].permute(2, 0, 1) * 2 - 1},
                                 FRAMES, world.SIZE, world.SIZE).to(device)
        out = to_images(vae, generate(i2v, enc, cap.text(), i, device, y=y))
        res["i2v_psnr0"].append(world.psnr(out[0], ref[0]))
        res["i2v_all"] += metrics.adherence(cap, out)["all"]
    out = {k: v / n for k, v in res.items() if k != "i2v_psnr0"}
    out["i2v_psnr0_db"] = sum(res["i2v_psnr0"]) / n
    out["seeds"] = n
    return out


# ------------------------------------------------------------------------------------------- save

def _half(state):
    return {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in state.items()}


def save_all(out, report, vae, enc=None, t2v=None, i2v=None):
    """The four model files (those given) and train_report.json."""
    os.makedirs(out, exist_ok=True)
    meta = {"cvg_demo": "1", "seed": str(report["args"]["seed"])}
    save_file(_half(vae.state_dict()), os.path.join(out, FILES["vae"]),
              {**meta, "config": json.dumps(VAE_CONFIG)})
    if t2v is not None:
        save_file(_half(t2v.state_dict()), os.path.join(out, FILES["t2v"]),
                  {**meta, "config": json.dumps(DIT_CONFIG)})
        save_file(_half(i2v.state_dict()), os.path.join(out, FILES["i2v"]),
                  {**meta, "config": json.dumps({**DIT_CONFIG, **I2V_OVERRIDES})})
        save_file({k: v.detach().float().contiguous().cpu() for k, v in enc.state_dict().items()},
                  os.path.join(out, FILES["text"]), {**meta, "config": json.dumps(ENCODER_CONFIG)})
    with open(os.path.join(out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)


def _load(folder, name, device):
    return {k: v.float().to(device) for k, v in load_file(os.path.join(folder, FILES[name])).items()}


def load_vae(folder, device):
    """A VAE saved by an earlier run (fp16 file, so the DiT then trains on the weights that ship)."""
    vae = WanVAE(VAE_CONFIG)
    vae.load_state_dict(_load(folder, "vae", "cpu"))
    return vae.to(device).eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=6000)
    p.add_argument("--vae-seconds", type=float, default=0, help="wall-clock cap for the VAE stage (0 = none)")
    p.add_argument("--vae-batch", type=int, default=64, help="clips per step of the video phase")
    p.add_argument("--vae-image-batch", type=int, default=256, help="frames per step of the image phase")
    p.add_argument("--vae-image-steps", type=int, default=4000)
    p.add_argument("--vae-image-share", type=float, default=0.4,
                   help="share of --vae-seconds spent on the image phase")
    p.add_argument("--vae-clips", type=int, default=4096)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-init", choices=("per-frame", "random"), default="per-frame",
                   help="per-frame: a fresh VAE starts as a per-frame image autoencoder (init_per_frame)")
    p.add_argument("--amp", choices=("bf16", "off"), default=None,
                   help="bf16 autocast of the training forwards (default: bf16 on CUDA, off on the CPU)")
    p.add_argument("--vae-stat-weight", type=float, default=0.1)
    p.add_argument("--vae-latent-noise", type=float, default=0.05)
    p.add_argument("--dit-steps", type=int, default=20000)
    p.add_argument("--dit-seconds", type=float, default=0, help="wall-clock cap for the DiT stage (0 = none)")
    p.add_argument("--dit-batch", type=int, default=512)
    p.add_argument("--dit-clips", type=int, default=16384)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--dit-object-weight", type=float, default=0.0,
                   help="extra loss weight of latent cells that show the object (0 = plain MSE)")
    p.add_argument("--dit-bounce-share", type=float, default=0.0,
                   help="share of DiT clips rendered with walls in reach (bounces; known-frame model only)")
    p.add_argument("--eval", type=int, default=32, help="seeds of the closing evaluation (0 = skip)")
    p.add_argument("--vae-eval", type=int, default=64, help="clips of the VAE reconstruction check")
    p.add_argument("--vae-from", default=None, help="folder of an earlier run: use its VAE, skip the VAE stage")
    p.add_argument("--vae-phases", default=None,
                   help="comma list of VAE phases to run (image,video); default both, none with --vae-from")
    p.add_argument("--dit-from", default=None, help="folder of an earlier run: continue training its DiTs")
    p.add_argument("--stop-after", choices=("vae", "dit"), default="dit",
                   help="vae: save the VAE (and report) and stop, for a second call to train the DiTs")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.vae_clips, args.vae_batch = 3, 8, 2
        args.vae_image_steps, args.vae_image_batch = 3, 4
        args.dit_steps, args.dit_clips, args.dit_batch, args.eval = 3, 16, 4, 1
    device = torch.device(args.device)
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "off"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    t_start = time.time()
    logs = []

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)
        logs.append(msg)

    phases = [x for x in args.vae_phases.split(",") if x] if args.vae_phases is not None else (
        [] if args.vae_from else ["image", "video"])
    vae, vae_rep = (load_vae(args.vae_from, device), {}) if args.vae_from else (None, {})
    if phases:
        vae, vae_rep = train_vae(args, device, log, vae, phases)
    if args.vae_from:
        vae_rep["from"] = os.path.basename(os.path.normpath(args.vae_from))
    vq = vae_quality(vae, device, args.seed + 100, n=8 if args.smoke else args.vae_eval)
    log(f"vae quality {vq}")
    report = {"args": vars(args), "vae": {**vae_rep, **vq},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    if args.stop_after == "vae":
        report["total_seconds"], report["log"] = time.time() - t_start, logs
        save_all(args.out, report, vae)
        return report
    data = build_dit_dataset(vae, args, device, log)
    enc, t2v, i2v, dit_rep = train_dits(vae, data, args, device, log)
    report["dit"] = dit_rep
    save_all(args.out, report, vae, enc, t2v, i2v)  # save before the evaluation, in case it fails
    if args.eval:
        ev = evaluate(vae, enc, t2v, i2v, device, args.eval)
        log(f"eval {ev}")
        report["eval"] = ev
    report["total_seconds"] = time.time() - t_start
    report["log"] = logs
    save_all(args.out, report, vae, enc, t2v, i2v)
    return report


if __name__ == "__main__":
    main()
