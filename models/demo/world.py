"""The demo world: one coloured shape on a plain background, animated as its caption says.

`render(caption, frames, seed)` -> video [T, H, W, 3] float32 in 0..1 (ComfyUI IMAGE layout) plus the
ground-truth state per frame (centre, radius, colour). Everything is a pure function of (caption,
frames, size, seed): the seed only chooses the start position and size.

Motions
- moving <dir>: constant velocity (slowly 1 px/frame, quickly 2 px/frame at 64 px; scaled with size).
  With `safe=True` (the default for clips of at most SAFE_FRAMES = 17 frames) the start is chosen so the object
  stays inside the frame for the whole clip; otherwise it bounces off the walls (long clips).
- growing / shrinking: radius changes linearly (0.25 / 0.5 px per frame at 64 px); in long clips the
  radius bounces between R_MIN and R_MAX.
- turning <colour>: the colour blends linearly from the first colour to the second, starting at frame 2,
  over 12 (slowly) or 6 (quickly) frames, then stays.
"""
import math

import torch

from . import captions as C

PALETTE = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.88, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUND_RGB = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
SIZE = 64
SAFE_FRAMES = 17
R_MIN, R_MAX = 4.0, 18.0  # at 64 px
SPEED_PX = {"slowly": 1.0, "quickly": 2.0}
GROW_PX = {"slowly": 0.25, "quickly": 0.5}
TURN_FRAMES = {"slowly": 12, "quickly": 6}
DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def check_frames(frames):
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
        raise ValueError(f"demo clips must have 4k+1 frames (1, 5, 9, 17, 33, ...); got {frames!r}")


def _bounce(start, step, lo, hi, n):
    """Positions start + step*i reflected into [lo, hi] (triangle wave)."""
    p = start + step * torch.arange(n, dtype=torch.float64)
    span = hi - lo
    if span <= 0:
        return torch.full((n,), float(lo), dtype=torch.float64)
    q = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(q > span, 2 * span - q, q)


def trajectory(caption, frames, size=SIZE, seed=0, safe=None):
    """Per-frame state for a caption: dict of cx, cy, r [T] (pixels) and rgb [T, 3]."""
    check_frames(frames)
    if isinstance(caption, str):
        caption = C.parse(caption)
        if caption is None:
            raise ValueError("the demo world renders a non-empty caption; got an empty one")
    if safe is None:
        safe = frames <= SAFE_FRAMES
    scale = size / SIZE
    gen = torch.Generator().manual_seed(int(seed))

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))

    T = frames
    if caption.motion == "moving":
        r0 = uniform(7.0, 10.0) * scale
        speed = SPEED_PX[caption.speed] * scale
        dx, dy = DIR_VEC[caption.direction]
        lo, hi = r0 + 1.0, size - 1.0 - r0
        travel = speed * (T - 1)
        starts = []
        for d in (dx, dy):
            if safe and d != 0:
                if hi - lo <= travel:
                    raise ValueError(
                        f"{frames} frames of '{caption.text()}' do not fit in {size}px without a bounce; "
                        f"use at most {SAFE_FRAMES} frames or safe=False")
                s = uniform(lo, hi - travel) if d > 0 else uniform(lo + travel, hi)
            else:
                s = uniform(lo, hi)
            starts.append(s)
        cx = _bounce(starts[0], dx * speed, lo, hi, T)
        cy = _bounce(starts[1], dy * speed, lo, hi, T)
        r = torch.full((T,), r0, dtype=torch.float64)
    else:
        if caption.motion in ("growing", "shrinking"):
            rate = GROW_PX[caption.speed] * scale
            rmin, rmax = R_MIN * scale, R_MAX * scale
            room = rate * (T - 1)
            if caption.motion == "growing":
                r_start = uniform(rmin + 2 * scale, max(rmin + 2 * scale, min(9 * scale, rmax - room))) \
                    if safe else uniform(rmin, rmax)
                r = _bounce(r_start, rate, rmin, rmax, T)
            else:
                r_start = uniform(min(rmax - 1 * scale, max(12 * scale, rmin + room)), rmax - 1 * scale) \
                    if safe else uniform(rmin, rmax)
                r = _bounce(r_start, -rate, rmin, rmax, T)
            rmax_used = float(r.max())
        else:
            r = torch.full((T,), uniform(7.0, 10.0) * scale, dtype=torch.float64)
            rmax_used = float(r[0])
        lo, hi = rmax_used + 1.0, size - 1.0 - rmax_used
        cx = torch.full((T,), uniform(lo, hi), dtype=torch.float64)
        cy = torch.full((T,), uniform(lo, hi), dtype=torch.float64)
    c1 = torch.tensor(PALETTE[caption.colour], dtype=torch.float64)
    rgb = c1.expand(T, 3).clone()
    if caption.motion == "turning":
        c2 = torch.tensor(PALETTE[caption.colour2], dtype=torch.float64)
        n = TURN_FRAMES[caption.speed]
        a = ((torch.arange(T, dtype=torch.float64) - 2) / n).clamp(0, 1)[:, None]
        rgb = (1 - a) * c1 + a * c2
    return {"cx": cx, "cy": cy, "r": r, "rgb": rgb, "caption": caption}


def shape_mask(shape, cx, cy, r, size, supersample=4):
    """Coverage in 0..1 of a shape, [T, H, W], anti-aliased by supersampling."""
    s = supersample
    coords = (torch.arange(size * s, dtype=cx.dtype, device=cx.device) + 0.5) / s
    y = coords.view(1, -1, 1)
    x = coords.view(1, 1, -1)
    cx, cy, r = cx.view(-1, 1, 1), cy.view(-1, 1, 1), r.view(-1, 1, 1)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    elif shape == "square":
        h = r * 0.85
        m = ((x - cx).abs() <= h) & ((y - cy).abs() <= h)
    elif shape == "triangle":  # apex up, base at cy + r, half base width r
        top = cy - r
        m = (y >= top) & (y <= cy + r) & ((x - cx).abs() <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {C.SHAPES}")
    m = m.to(torch.float32)
    T = m.shape[0]
    return m.view(T, size, s, size, s).mean(dim=(2, 4))


def render(caption, frames, size=SIZE, seed=0, safe=None, return_state=False):
    """Render a caption. Returns video [T, size, size, 3] float32 0..1 (and the state dict)."""
    st = trajectory(caption, frames, size, seed, safe)
    cap = st["caption"]
    cov = shape_mask(cap.shape, st["cx"], st["cy"], st["r"], size)[..., None]
    bg = torch.tensor(BACKGROUND_RGB[cap.background], dtype=torch.float32)
    fg = st["rgb"].to(torch.float32)[:, None, None, :]
    video = (1 - cov) * bg + cov * fg
    return (video, st) if return_state else video


def scene(caption, frames, size=SIZE, seed=0):
    """What CVG Demo Scene shows: `render`, except that fewer than SAFE_FRAMES frames are the first frames
    of the seed's SAFE_FRAMES-frame clip, so a start image leaves room for a clip of the caption's motion
    (it does not start against the wall it moves towards)."""
    return render(caption, max(frames, SAFE_FRAMES), size, seed)[:frames]


def render_batch(captions, frames, size=SIZE, seeds=None, safe=None, device=None):
    """Several captions -> [B, T, H, W, 3] float32, rendered together on `device` (same pixels as
    `render` up to float rounding; used to make training data quickly on a GPU)."""
    seeds = list(seeds) if seeds is not None else list(range(len(captions)))
    states = [trajectory(c, frames, size, s, safe) for c, s in zip(captions, seeds)]
    B, T = len(states), frames
    dev = torch.device(device or "cpu")
    cx = torch.stack([st["cx"] for st in states]).to(dev, torch.float32)
    cy = torch.stack([st["cy"] for st in states]).to(dev, torch.float32)
    r = torch.stack([st["r"] for st in states]).to(dev, torch.float32)
    cov = torch.zeros(B, T, size, size, device=dev)
    for shape in C.SHAPES:
        idx = [i for i, st in enumerate(states) if st["caption"].shape == shape]
        if idx:
            sel = torch.tensor(idx, device=dev)
            cov[sel] = shape_mask(shape, cx[sel].flatten(), cy[sel].flatten(), r[sel].flatten(),
                                  size).view(len(idx), T, size, size)
    bg = torch.tensor([BACKGROUND_RGB[st["caption"].background] for st in states], device=dev)
    fg = torch.stack([st["rgb"] for st in states]).to(dev, torch.float32)
    cov = cov[..., None]
    return (1 - cov) * bg[:, None, None, None] + cov * fg[:, :, None, None]


def dataset_item(index, frames, size=SIZE, base_seed=0, motions=C.MOTIONS, safe=None):
    """Deterministic training sample number `index`: (caption text, video [T,H,W,3])."""
    gen = torch.Generator().manual_seed(int(base_seed) * 1_000_003 + int(index))
    cap = C.random_caption(gen, motions)
    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=gen))
    return cap.text(), render(cap, frames, size, seed, safe)


def long_clip(caption, segments, segment_frames=17, size=SIZE, seed=0):
    """Ground-truth long clip with the length of `segments` autoregressive segments that overlap by one
    frame: 1 + segments*(segment_frames-1) frames (a 4k+1 count), walls bounce."""
    check_frames(segment_frames)
    n = 1 + segments * (segment_frames - 1)
    return render(caption, n, size, seed, safe=False)


def psnr(a, b, peak=1.0):
    mse = torch.mean((a.float() - b.float()) ** 2)
    return float("inf") if mse == 0 else float(10 * math.log10(peak ** 2 / float(mse)))
