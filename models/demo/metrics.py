"""Measurement of demo-world videos by colour segmentation (no learned parts, no eyeballing).

Input videos are ComfyUI IMAGE tensors [T, H, W, 3] in 0..1.

Per frame (`track`): the background colour is the median of a 2-pixel border ring; object pixels are those
farther than `threshold` (RGB Euclidean) from it; the largest 8-connected component of them is the
object. From it: area, centroid, mean colour of its interior, bounding-box fill and top-half share
(shape cue: circle fill ≈ 0.79, square ≈ 1, triangle ≈ 0.5 with only ~25 % of its area in the top half).

Per clip (`summarise`): colour / shape / background names (nearest palette entry, majority over frames),
motion direction from the centroid displacement, size trend, first and last colour, the frame where the
object is lost. `adherence(caption, video)` checks a clip against its caption; `segment_drift` gives
the per-segment drift table of long clips.
"""
import math

import torch
import torch.nn.functional as F

from . import captions as C
from .world import BACKGROUND_RGB, PALETTE, SIZE, psnr  # noqa: F401  (psnr re-exported)

THRESHOLD = 0.25
MIN_AREA = 10  # pixels at 64x64, scaled by area for other sizes


def _nearest(rgb, table):
    names = list(table)
    ref = torch.tensor([table[n] for n in names], dtype=torch.float32)
    d = torch.cdist(rgb.float().view(-1, 3), ref)
    return [names[i] for i in d.argmin(dim=1).tolist()], d.min(dim=1).values


def _check_video(video):
    if not torch.is_tensor(video) or video.ndim != 4 or video.shape[-1] != 3:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"expected a video [T, H, W, 3] in 0..1 (ComfyUI IMAGE); got {shape}")
    return video.detach().float().cpu().clamp(0, 1)


def background(video):
    """[T, 3] median colour of the 2-pixel border ring of each frame."""
    v = _check_video(video)
    ring = torch.cat([v[:, :2].reshape(v.shape[0], -1, 3), v[:, -2:].reshape(v.shape[0], -1, 3),
                      v[:, 2:-2, :2].reshape(v.shape[0], -1, 3), v[:, 2:-2, -2:].reshape(v.shape[0], -1, 3)],
                     dim=1)
    return ring.median(dim=1).values


def _largest_component(mask):
    """mask [T, H, W] bool -> bool mask of the largest 8-connected component per frame."""
    T, H, W = mask.shape
    if not mask.any():
        return mask
    idx = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(T, H, W)
    lab = torch.where(mask, idx, torch.zeros(()))
    m = mask.float()[:, None]
    lab = lab[:, None]
    for _ in range(H * W):
        new = F.max_pool2d(lab, 3, stride=1, padding=1) * m
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab[:, 0].long().view(T, -1)
    out = torch.zeros(T, H * W, dtype=torch.bool)
    for t in range(T):
        if lab[t].max() == 0:
            continue
        counts = torch.bincount(lab[t], minlength=H * W + 1)
        counts[0] = 0
        out[t] = lab[t] == counts.argmax()
    return out.view(T, H, W)


def track(video, threshold=THRESHOLD):
    """Per-frame measurements: dict of tensors [T] (present, area, cx, cy, fill, top_share), rgb [T,3],
    bg [T,3]."""
    v = _check_video(video)
    T, H, W, _ = v.shape
    bg = background(v)
    dist = (v - bg[:, None, None]).norm(dim=-1)
    obj = _largest_component(dist > threshold)
    min_area = MIN_AREA * H * W / (SIZE * SIZE)
    area = obj.flatten(1).sum(1).float()
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    a = area.clamp(min=1)
    cx = (obj * xs).flatten(1).sum(1) / a
    cy = (obj * ys).flatten(1).sum(1) / a
    # interior: pixels whose 4 neighbours are also object pixels (edges blend with the background)
    pad = F.pad(obj.float()[:, None], (1, 1, 1, 1))
    inner = (-F.max_pool2d(-pad, 3, stride=1, padding=0))[:, 0] > 0.5
    inner = torch.where(inner.flatten(1).any(1)[:, None, None], inner, obj)
    rgb = (v * inner[..., None]).flatten(1, 2).sum(1) / inner.flatten(1).sum(1).clamp(min=1)[:, None]
    fill = torch.zeros(T)
    top = torch.zeros(T)
    for t in range(T):
        if area[t] == 0:
            continue
        yy, xx = torch.nonzero(obj[t], as_tuple=True)
        y0, y1, x0, x1 = int(yy.min()), int(yy.max()), int(xx.min()), int(xx.max())
        fill[t] = area[t] / ((y1 - y0 + 1) * (x1 - x0 + 1))
        top[t] = (yy.float() < (y0 + y1) / 2).float().sum() / area[t]
    return {"present": area >= min_area, "area": area, "cx": cx, "cy": cy, "rgb": rgb, "bg": bg,
            "fill": fill, "top_share": top, "size": (H, W)}


def shape_of(fill, top_share):
    if top_share < 0.38:
        return "triangle"
    return "square" if fill > 0.86 else "circle"


def _majority(names):
    if not names:
        return None
    return max(set(names), key=names.count)


def summarise(video=None, tr=None, window=None):
    """Clip-level measurements (see module doc). `window` limits the direction/size measurement to the
    first `window` frames."""
    tr = tr if tr is not None else track(video)
    present = tr["present"]
    T = present.shape[0]
    H, W = tr["size"]
    idx = torch.nonzero(present).flatten().tolist()
    bg_names, _ = _nearest(tr["bg"], BACKGROUND_RGB)
    out = {"frames": T, "present_frames": len(idx), "background": _majority(bg_names)}
    lost = next((t for t in range(T) if not bool(present[t])), None)
    out["lost_frame"] = lost
    if not idx:
        out.update(colour=None, first_colour=None, last_colour=None, shape=None, direction=None,
                   size_trend=None, displacement=(0.0, 0.0), area_ratio=None)
        return out
    names, _ = _nearest(tr["rgb"][idx], PALETTE)
    out["colour"] = _majority(names)
    out["first_colour"] = names[0]
    out["last_colour"] = names[-1]
    out["shape"] = _majority([shape_of(float(tr["fill"][t]), float(tr["top_share"][t])) for t in idx])
    w = [t for t in idx if window is None or t < window]
    k = max(1, min(3, len(w) // 3))
    first, last = w[:k], w[-k:]
    dx = float(tr["cx"][last].mean() - tr["cx"][first].mean())
    dy = float(tr["cy"][last].mean() - tr["cy"][first].mean())
    out["displacement"] = (dx, dy)
    min_disp = 2.0 * W / SIZE
    if max(abs(dx), abs(dy)) < min_disp or len(w) < 2:
        out["direction"] = "still"
    elif abs(dx) >= abs(dy):
        out["direction"] = "right" if dx > 0 else "left"
    else:
        out["direction"] = "down" if dy > 0 else "up"
    ratio = float(tr["area"][last].mean() / tr["area"][first].mean().clamp(min=1))
    out["area_ratio"] = ratio
    out["size_trend"] = "growing" if ratio > 1.25 else "shrinking" if ratio < 0.8 else "steady"
    return out


def adherence(caption, video):
    """Does a clip show its caption? dict of booleans colour/shape/motion/background/all + the summary.
    `all` = colour and shape and motion (the prompt-adherence criterion of docs/quality.md)."""
    cap = C.parse(caption) if isinstance(caption, str) else caption
    if cap is None:
        raise ValueError("adherence needs a non-empty caption")
    s = summarise(video)
    if cap.motion == "moving":
        motion = s["direction"] == cap.direction
    elif cap.motion in ("growing", "shrinking"):
        motion = s["size_trend"] == cap.motion
    else:
        motion = s["first_colour"] == cap.colour and s["last_colour"] == cap.colour2
    colour = (s["first_colour"] if cap.motion == "turning" else s["colour"]) == cap.colour
    res = {"colour": colour, "shape": s["shape"] == cap.shape, "motion": bool(motion),
           "background": s["background"] == cap.background}
    res["all"] = res["colour"] and res["shape"] and res["motion"]
    res["summary"] = s
    return res


def consistency(video, reference=None):
    """Object consistency over a clip: share of frames whose object has frame 0's (or `reference`'s)
    colour and shape and is present; relative spread of its area; mean RGB distance of its colour to
    frame 0's."""
    tr = track(video)
    ref = tr if reference is None else track(reference[:1])
    if not bool(ref["present"][0]):
        return {"consistent_share": 0.0, "area_cv": float("nan"), "colour_shift": float("nan")}
    (c0,), _ = _nearest(ref["rgb"][:1], PALETTE)
    s0 = shape_of(float(ref["fill"][0]), float(ref["top_share"][0]))
    names, _ = _nearest(tr["rgb"], PALETTE)
    ok = [bool(tr["present"][t]) and names[t] == c0 and
          shape_of(float(tr["fill"][t]), float(tr["top_share"][t])) == s0 for t in range(len(names))]
    area = tr["area"][tr["present"]]
    return {"consistent_share": sum(ok) / len(ok),
            "area_cv": float(area.std() / area.mean()) if area.numel() > 1 else 0.0,
            "colour_shift": float((tr["rgb"][tr["present"]] - ref["rgb"][0]).norm(dim=-1).mean())}


def lost_frame(video, caption=None):
    """First frame where the object is absent, or (given a caption) no longer has the captioned colour
    (second colour once a 'turning' caption's change is due); None when it is never lost."""
    tr = track(video)
    T = tr["present"].shape[0]
    cap = C.parse(caption) if isinstance(caption, str) else caption
    names, _ = _nearest(tr["rgb"], PALETTE)
    for t in range(T):
        if not bool(tr["present"][t]):
            return t
        if cap is not None and cap.motion != "turning" and names[t] != cap.colour:
            return t
    return None


def segment_drift(video, caption, segment_frames, reference_area=None):
    """Long clips: per segment (frames [i*(n-1), (i+1)*(n-1)] for n = segment_frames) the object colour
    error (RGB distance to the palette colour), area relative to the first segment (or
    `reference_area`), background error, and share of frames with the object present."""
    cap = C.parse(caption) if isinstance(caption, str) else caption
    tr = track(video)
    T = tr["present"].shape[0]
    step = segment_frames - 1
    target = torch.tensor(PALETTE[cap.colour if cap.motion != "turning" else cap.colour2])
    bg_target = torch.tensor(BACKGROUND_RGB[cap.background])
    rows = []
    ref_area = reference_area
    for i, s in enumerate(range(0, max(T - 1, 1), step)):
        sl = slice(s, min(s + step + 1, T))
        p = tr["present"][sl]
        rgb = tr["rgb"][sl][p]
        area = tr["area"][sl][p]
        mean_area = float(area.mean()) if area.numel() else 0.0
        if ref_area is None:
            ref_area = mean_area if mean_area > 0 else None
        rows.append({
            "segment": i,
            "present_share": float(p.float().mean()),
            "colour_error": float((rgb - target).norm(dim=-1).mean()) if rgb.numel() else math.nan,
            "area_rel": (mean_area / ref_area) if ref_area else math.nan,
            "background_error": float((tr["bg"][sl] - bg_target).norm(dim=-1).mean()),
        })
    return rows
